"""A ViT as an MLflow model: logging it, and reading it back in the plain form fine-tuning takes.

A ViT is logged once as an MLflow model that serves (``mlflow.pyfunc`` / ``mlflow.pytorch``, exported
with ``torch.export``: no pickle) and carries, as extra files of the same model, the plain weights
(``weights.pt``, loaded with ``torch.load(weights_only=True)``), the ``ViTConfig`` and the class names:
the form fine-tuning reads. So one URI (``models:/vit-pretrained/3``, ``runs:/<id>/model``) is enough.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

from vit import VisionTransformer, ViTConfig
from vit.checkpoint import load_weights_only
from vit.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, eval_loader
from workflows.tracking.runs import _using, client, log_artifacts, missing_store

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "vit_config.json"
CLASSES_FILE = "class_names.json"
PREPROCESSING_FILE = "preprocessing.json"  # what inputs the model expects: resolution, mean, std, crop


@dataclass(frozen=True)
class LoggedModel:
    model_uri: str  # models:/m-<id>: MLflow's LoggedModel, linked to the run
    run_id: str


def log_vit_model(
    tracking_uri: str,
    run_id: str,
    model: VisionTransformer,
    class_names: list[str],
    *,
    preprocessing: Mapping[str, object] | None = None,
    name: str = "model",
) -> LoggedModel:
    """Log ``model`` to ``run_id``: an exported MLflow pytorch model with a signature and a batch-2
    input example (so the batch dimension stays dynamic), plus the plain weights, config and class
    names fine-tuning needs."""
    model = model.eval().cpu()
    height, width = model.config.image_size
    example = np.random.default_rng(0).standard_normal((2, model.config.in_chans, height, width)).astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        extra = _write_plain_model(Path(tmp), model, class_names, preprocessing or {})
        with _using(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                input_example=example,
                extra_files=[str(path) for path in extra],
                serialization_format="pt2",  # torch.export: loading it runs no pickle
                # Stated, not inferred: MLflow infers requirements by loading the model in a fresh Python
                # process and scanning every installed distribution (18 s of a 28 s log on a 2-core Xeon;
                # it also picked up nvidia-ml-py and tqdm). Loading an exported ViT needs what MLflow's
                # pytorch flavour lists by default (torch, cloudpickle); MLflow adds itself.
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
    return LoggedModel(model_uri=info.model_uri, run_id=run_id)


def _write_plain_model(folder: Path, model: VisionTransformer, class_names: list[str],
                       preprocessing: Mapping[str, object]) -> list[Path]:
    weights, config, classes = folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / CLASSES_FILE
    (folder / PREPROCESSING_FILE).write_text(json.dumps(dict(preprocessing), indent=2))
    torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, weights)
    config.write_text(json.dumps(model.config.to_dict(), indent=2))
    classes.write_text(json.dumps(list(class_names)))
    return [weights, config, classes, folder / PREPROCESSING_FILE]


def _logged_model_uri(tracking_uri: str, model_uri: str) -> str:
    """``runs:/<id>/model`` -> the run's logged model (``models:/m-...``): since MLflow 3 a model logged
    in a run lives outside the run's artifacts. Other URIs pass through."""
    if not model_uri.startswith("runs:/"):
        return model_uri
    run_id = model_uri.removeprefix("runs:/").split("/")[0]
    try:
        outputs = client(tracking_uri).get_run(run_id).outputs
    except mlflow.exceptions.MlflowException:
        return model_uri
    if outputs and outputs.model_outputs:
        return f"models:/{outputs.model_outputs[-1].model_id}"
    return model_uri


def logged_model_config(tracking_uri: str, model_uri: str) -> ViTConfig:
    """A logged ViT's architecture alone, read from its ``vit_config.json`` (a few hundred bytes) without
    downloading its weights: for checks before any work starts. Takes the URIs :func:`load_plain_model` takes."""
    local = Path(model_uri)
    if local.exists():
        found = next((path for path in (local / "extra_files" / CONFIG_FILE, local / CONFIG_FILE) if path.is_file()), None)
        text = found.read_text() if found else None
    else:
        store = missing_store(tracking_uri)
        if store is not None:
            raise ValueError(f"model {model_uri!r} cannot be resolved: there is no tracking store at {store}")
        text = _logged_file(tracking_uri, _logged_model_uri(tracking_uri, model_uri), CONFIG_FILE)
    if text is None:
        raise ValueError(f"model {model_uri!r} is not a vitflow ViT: it holds no {CONFIG_FILE}")
    try:
        return ViTConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as error:
        raise ValueError(f"model {model_uri!r}: {CONFIG_FILE} is not a ViT configuration: {error}") from None


def _logged_file(tracking_uri: str, model_uri: str, name: str) -> str | None:
    """One of the plain files a logged model holds (under extra_files/, as log_vit_model writes them, or at
    its top), or None."""
    with tempfile.TemporaryDirectory(prefix="vitflow-file-") as scratch, _using(tracking_uri):
        for path in (f"extra_files/{name}", name):
            try:
                if model_uri.startswith("models:/"):  # a file inside models:/m-... has no URI of its own
                    local = ModelsArtifactRepository(model_uri).download_artifacts(path, scratch)
                else:
                    local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{path}", dst_path=scratch)
            except (mlflow.exceptions.MlflowException, OSError):
                continue
            return Path(local).read_text()
    return None


@dataclass(frozen=True)
class PlainModel:
    """What fine-tuning and evaluation need from a logged ViT: no pickle, no exported graph."""

    config: ViTConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    source_uri: str
    preprocessing: dict  # mean, std, crop_pct the model was trained with ({} when unknown)


def load_plain_model(tracking_uri: str, model_uri: str) -> PlainModel:
    """Resolve ``models:/name/3``, ``models:/name@alias``, ``runs:/<id>/model`` or a local folder of a
    logged ViT to its weights, config and class names."""
    local = Path(model_uri)
    if not local.exists():
        if not urlparse(model_uri).scheme:
            raise ValueError(f"model {model_uri!r}: no such folder (give a model folder, or a models:/ or runs:/ URI)")
        store = missing_store(tracking_uri)
        if store is not None:
            raise ValueError(f"model {model_uri!r} cannot be resolved: there is no tracking store at {store} "
                             "(run where the workflow's mlflow.db is, or give its tracking URI)")
        try:
            with _using(tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_logged_model_uri(tracking_uri, model_uri)))
        except mlflow.exceptions.MlflowException as error:
            raise ValueError(f"model {model_uri!r} cannot be resolved: {error.message}") from None
    folder = local / "extra_files" if (local / "extra_files").is_dir() else local
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"model {model_uri!r} is not a vitflow ViT: {', '.join(missing)} missing in {folder}")
    config = ViTConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    try:
        state_dict = load_weights_only(folder / WEIGHTS_FILE)  # a downloaded file: never unpickle code from it
    except ValueError as error:
        raise ValueError(f"model {model_uri!r}: {error}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"model {model_uri!r}: {WEIGHTS_FILE} is not a state dict of tensors")
    class_names = json.loads((folder / CLASSES_FILE).read_text())
    preprocessing = json.loads((folder / PREPROCESSING_FILE).read_text()) if (folder / PREPROCESSING_FILE).is_file() else {}
    return PlainModel(config=config, state_dict=state_dict, class_names=class_names, source_uri=model_uri,
                      preprocessing=preprocessing)


# --- what a logged model carries besides its weights: its preprocessing and the paper's figures ---


def model_data_config(preprocessing: dict, image_size: int, batch_size: int) -> DataConfig:
    """Evaluation inputs as the model was trained: its resolution, normalisation and centre crop."""
    return DataConfig(
        batch_size=batch_size, num_workers=0, image_size=image_size,
        mean=tuple(preprocessing.get("mean", IMAGENET_MEAN)), std=tuple(preprocessing.get("std", IMAGENET_STD)),
        crop_pct=preprocessing.get("crop_pct", 0.875),
    )


def preprocessing_of(data: DataConfig) -> dict:
    return {"image_size": data.image_size, "mean": list(data.mean), "std": list(data.std), "crop_pct": data.crop_pct}


def log_model_figures(tracking_uri: str, run_id: str, model, dataset: str, split: str, data: DataConfig,
                      num_images: int = 8) -> list[str]:
    """The paper's Figure 7 (patch-embedding PCs, position-embedding similarity, attention distance) and
    Figure 6 (attention rollout over a few images of ``split``) as PNG artifacts under ``figures/``."""
    from vit.figures import write_vit_figures

    loader = eval_loader(dataset, DataConfig.from_dict({**data.to_dict(), "batch_size": num_images, "num_workers": 0}),
                         rank=0, world_size=1, split=split)
    images = next(iter(loader))[0]  # (n, C, H, W), normalised
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_vit_figures(model.eval(), images, tmp, mean=data.mean, std=data.std, rollout_images=num_images)
        log_artifacts(tracking_uri, run_id, list(paths.values()), "figures")
    return [f"figures/{path.name}" for path in paths.values()]
