"""The model registry: registering a logged model, versions and aliases, and which run logged a model."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import mlflow

from workflows.tracking.runs import _using, client

log = logging.getLogger(__name__)


def register_model(tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, object], run_id: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` and return the version. Idempotent per run:
    when ``run_id`` already registered a version of ``name`` (a resumed or repeated stage), that one is
    returned, so reruns never create duplicate versions."""
    mlflow_client = client(tracking_uri, registry=True)
    for version in mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        log.info("%s version %s was already registered by run %s", name, version.version, run_id)
        return str(version.version)
    with _using(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags={key: str(value) for key, value in tags.items()})
    return str(version.version)


def finished_model(tracking_uri: str, run_id: str, registered_name: str | None) -> tuple[str, str | None, dict[str, float]] | None:
    """(model URI, registered version, final metrics) of a FINISHED run that logged a model; else None."""
    mlflow_client = client(tracking_uri, registry=True)
    run = mlflow_client.get_run(run_id)
    if run.info.status != "FINISHED" or not run.outputs or not run.outputs.model_outputs:
        return None
    version = None
    if registered_name:
        versions = mlflow_client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
        if not versions:
            return None
        version = str(versions[0].version)
    return f"models:/{run.outputs.model_outputs[-1].model_id}", version, dict(run.data.metrics)


def resolve_version(tracking_uri: str, model_uri: str) -> str | None:
    """The registered version behind ``models:/name/3`` or ``models:/name@alias``; None for other URIs."""
    if not model_uri.startswith("models:/"):
        return None
    name_and_ref = model_uri.removeprefix("models:/").split("/")
    mlflow_client = client(tracking_uri, registry=True)
    if "@" in name_and_ref[0]:
        name, alias = name_and_ref[0].split("@", 1)
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    return name_and_ref[1] if len(name_and_ref) > 1 else None


def pinned_model_uri(tracking_uri: str, model_uri: str) -> str:
    """``models:/name@alias`` -> ``models:/name/<its version now>``, so that everything that loads the model
    later loads the same one even if the alias moves; other URIs as given. ``ValueError`` naming the URI
    when the registry has no such model or alias."""
    if not (model_uri.startswith("models:/") and "@" in model_uri):
        return model_uri
    name = model_uri.removeprefix("models:/").split("@", 1)[0]
    try:
        return f"models:/{name}/{resolve_version(tracking_uri, model_uri)}"
    except mlflow.exceptions.MlflowException as error:
        raise ValueError(f"model {model_uri!r} cannot be resolved: {error.message}") from None


def source_run(tracking_uri: str, model_uri: str) -> str | None:
    """The run that logged a model: for registered versions, aliases, runs:/ and models:/m-... URIs."""
    mlflow_client = client(tracking_uri, registry=True)
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/")[0]
    if not model_uri.startswith("models:/"):
        return None
    reference = model_uri.removeprefix("models:/")
    if reference.startswith("m-"):
        return mlflow_client.get_logged_model(reference.split("/")[0]).source_run_id
    version = resolve_version(tracking_uri, model_uri)
    name = reference.split("@")[0].split("/")[0]
    return mlflow_client.get_model_version(name, version).run_id if version else None


def model_exists(tracking_uri: str, model_uri: str) -> bool:
    """Whether a registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``), a logged model
    (``models:/m-...``) or a run (``runs:/ID/...``) exists."""
    mlflow_client = client(tracking_uri, registry=True)
    reference = model_uri.removeprefix("models:/")
    try:
        if model_uri.startswith("runs:/"):
            mlflow_client.get_run(model_uri.removeprefix("runs:/").split("/")[0])
        elif reference.startswith("m-"):
            mlflow_client.get_logged_model(reference.split("/")[0])
        elif "@" in reference:
            name, alias = reference.split("@", 1)
            mlflow_client.get_model_version_by_alias(name, alias)
        else:
            name, version = reference.split("/")[:2]
            mlflow_client.get_model_version(name, version)
    except (mlflow.exceptions.MlflowException, ValueError):
        return False
    return True


def promote_if_better(tracking_uri: str, name: str, version: str, alias: str, *, test_key: str, score: float) -> bool:
    """Point ``alias`` at ``version`` when the alias is free, or its holder scored lower on the same test
    split (``test_key``: dataset fingerprint and split). A holder measured on another split cannot be
    compared, so it keeps the alias. Returns whether ``version`` holds the alias now."""
    mlflow_client = client(tracking_uri, registry=True)
    try:
        holder = mlflow_client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        holder = None
    if holder is not None:
        if str(holder.version) == str(version):
            return True
        same_split = holder.tags.get("test_split") == test_key
        holder_score = float(holder.tags.get("test_top1", "nan"))
        if same_split and not score > holder_score:
            log.info("%s@%s stays on version %s (%.4f >= %.4f)", name, alias, holder.version, holder_score, score)
            return False
        if not same_split:
            log.info("%s@%s was measured on another test split; comparing is impossible, keeping it", name, alias)
            return False
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    return True
