"""A ViT as an MLflow model: logging it, and reading it back in the plain form fine-tuning takes.

A ViT is logged once, as an MLflow pyfunc that classifies images (``workflows/tracking/served_model.py``: a
model from code, base64 images in, class names and probabilities out; ``mlflow models serve`` serves it)
whose artifact ``model/`` holds the four plain files of ``vit.inference.MODEL_FILES``: the weights (loaded
with ``torch.load(weights_only=True)``), the ``ViTConfig``, the class names and the preprocessing. Those
files are what fine-tuning, evaluation and prediction read, so one URI (``models:/vit-pretrained/3``,
``runs:/<id>/model``) is enough. Models logged before (a torch.export model with the same files under
``extra_files/``) still read.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import torch
import torchvision
from mlflow.models import ModelSignature
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

import vit
from vit import VisionTransformer, ViTConfig
from vit.checkpoint import load_weights_only
from vit.data import DataConfig, eval_loader
from vit.inference import (
    CLASSES_FILE,
    CONFIG_FILE,
    PREPROCESSING_FILE,
    WEIGHTS_FILE,
    write_model_files,
)
from workflows.tracking.runs import _using, client, log_artifacts, missing_store

SERVED_MODEL = Path(__file__).with_name("served_model.py")
MODEL_ARTIFACT = "model"  # the pyfunc's artifact: a folder of the plain files
# where a logged model keeps the plain files: this version's pyfunc artifact, then earlier versions' extra files
PLAIN_FOLDERS = (f"artifacts/{MODEL_ARTIFACT}", "extra_files", "")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                    ColSpec(Array("string"), "top_labels"), ColSpec(Array("double"), "top_scores")]),
    params=ParamSchema([ParamSpec("top_k", "long", 5)]),
)


@dataclass(frozen=True)
class LoggedModel:
    model_uri: str  # models:/m-<id>: MLflow's LoggedModel, linked to the run
    run_id: str


def pip_requirements() -> list[str]:
    """What loading a logged ViT needs (MLflow adds itself): this torch and torchvision (a CUDA or CPU
    build's local tag dropped: pip resolves the build for the machine), Pillow to decode images."""
    from PIL import __version__ as pillow

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"pillow=={pillow}"]


def example_image(size: int) -> str:
    """A base64 PNG of a ``size`` x ``size`` colour gradient: the logged input example."""
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def log_vit_model(
    tracking_uri: str,
    run_id: str,
    model: VisionTransformer,
    class_names: list[str],
    *,
    preprocessing: Mapping[str, object] | None = None,
    name: str = "model",
) -> LoggedModel:
    """Log ``model`` to ``run_id`` as the image-classifying pyfunc (see the module docstring), with its
    signature, a one-image input example (MLflow checks the model answers it before logging) and
    stated requirements (:func:`pip_requirements`)."""
    model = model.eval().cpu()
    # Logging reopens the run; a run already closed (a search's champion may be a trial its scheduler
    # stopped: KILLED) keeps its status and end time.
    before = client(tracking_uri).get_run(run_id).info
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        write_model_files(folder, model, class_names, preprocessing or {})
        with _using(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(SERVED_MODEL),
                artifacts={MODEL_ARTIFACT: str(folder)},
                code_paths=[str(Path(vit.__file__).parent)],  # the model loads without vitflow installed
                signature=SIGNATURE,
                input_example=pd.DataFrame({"image": [example_image(model.config.image_size[0])]}),
                # Stated, not inferred: MLflow infers requirements by loading the model in a fresh Python
                # process and scanning every installed distribution (18 s of a 28 s log on a 2-core Xeon).
                pip_requirements=pip_requirements(),
            )
    if before.status != "RUNNING":
        client(tracking_uri).set_terminated(run_id, before.status, end_time=before.end_time)
    return LoggedModel(model_uri=info.model_uri, run_id=run_id)


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
        found = next((path for path in (local / sub / CONFIG_FILE for sub in PLAIN_FOLDERS) if path.is_file()), None)
        text = found.read_text() if found else None
    else:
        if not urlparse(model_uri).scheme:
            raise ValueError(f"model {model_uri!r}: no such folder (give a model folder, or a models:/ or runs:/ URI)")
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
    """One of the plain files a logged model holds (in the first of ``PLAIN_FOLDERS`` that has it,
    its top), or None."""
    with tempfile.TemporaryDirectory(prefix="vitflow-file-") as scratch, _using(tracking_uri):
        for path in (f"{sub}/{name}".lstrip("/") for sub in PLAIN_FOLDERS):
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
    folder = next((local / sub for sub in PLAIN_FOLDERS if (local / sub / CONFIG_FILE).is_file()), local)
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
