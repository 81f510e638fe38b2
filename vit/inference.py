"""Classifying encoded images with a trained ViT, seen the way it was evaluated in training.

A trained vitflow model is four files (``MODEL_FILES``): its weights, its ``ViTConfig``, its class names
and its preprocessing (resolution, normalisation, centre crop: what evaluation applied). ``ImageClassifier``
holds them and turns encoded images (JPEG, PNG, WebP: whatever PIL reads) into class probabilities and the
top-k class names. It is the one path behind the MLflow pyfunc every model is logged with, batch prediction
and serving, so all of them answer alike for the same image. Plain PyTorch, torchvision's transforms, PIL.

A bad image never takes its batch down: :meth:`ImageClassifier.classify` returns, in order, a
:class:`Prediction` for each good image and the ``ValueError`` (with the decoder's reason) for each bad one;
the caller decides whether that is fatal (a served request) or a row (batch prediction).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vit.checkpoint import load_weights_only
from vit.config import ViTConfig
from vit.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from vit.data.shards import decode_image
from vit.data.transforms import eval_transform
from vit.model import VisionTransformer
from vit.precision import PrecisionChoice, autocast, probe, resolve_precision

WEIGHTS_FILE = "weights.pt"  # the state dict (tensors only: loaded with weights_only=True)
CONFIG_FILE = "vit_config.json"
CLASSES_FILE = "class_names.json"
PREPROCESSING_FILE = "preprocessing.json"  # image_size, mean, std, crop_pct
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE, PREPROCESSING_FILE)


def data_config(preprocessing: Mapping[str, object], image_size: int, batch_size: int = 64) -> DataConfig:
    """Evaluation inputs as the model was trained: its resolution, normalisation and centre crop (ImageNet's
    mean and std and crop 0.875 where a model's preprocessing does not say)."""
    return DataConfig(
        batch_size=batch_size, num_workers=0, image_size=image_size,
        mean=tuple(preprocessing.get("mean", IMAGENET_MEAN)), std=tuple(preprocessing.get("std", IMAGENET_STD)),
        crop_pct=preprocessing.get("crop_pct", 0.875),
    )


def write_model_files(folder: str | Path, model: VisionTransformer, class_names: Sequence[str],
                      preprocessing: Mapping[str, object]) -> list[Path]:
    """The four files of a trained model, written to ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    (folder / CLASSES_FILE).write_text(json.dumps(list(class_names)))
    (folder / PREPROCESSING_FILE).write_text(json.dumps(dict(preprocessing), indent=2))
    return [folder / name for name in MODEL_FILES]


def batch_size_for(config: ViTConfig, memory_bytes: float, *, bytes_per_value: int = 4, limit: int = 512) -> int:
    """The largest batch (up to ``limit``) whose forward pass without gradients keeps its activations within
    ``memory_bytes``. Per image, one block at a time is alive: its tokens (T x D) a few times over (the
    input, q, k, v, the attention output, the residual: 6) plus the MLP's hidden layer (T x ``mlp_ratio`` D),
    and the attention scores and their softmax (2 x heads x T x T)."""
    tokens = config.num_patches + 1
    per_image = bytes_per_value * (tokens * config.embed_dim * (6 + config.mlp_ratio) + 2 * config.num_heads * tokens**2)
    return int(max(1, min(limit, memory_bytes // per_image)))


class ImagePreparer:
    """Encoded bytes -> (3, S, S) uint8, decoded, resized and centre-cropped as a model with this
    preprocessing was evaluated: what batch prediction does where the bytes are read, apart from the model."""

    def __init__(self, preprocessing: Mapping[str, object], image_size: int):
        from torchvision.transforms import v2

        steps = eval_transform(data_config(preprocessing, image_size)).transforms  # resize, crop, float, normalise
        self.geometry, self.normalize = v2.Compose(steps[:2]), v2.Compose(steps[2:])

    def __call__(self, data: bytes, what: str = "image") -> torch.Tensor:
        """``ValueError`` naming ``what`` if the bytes are no image."""
        return self.geometry(decode_image(data, what=what))


@dataclass(frozen=True)
class Prediction:
    label: str  # the top-1 class name
    score: float  # its probability
    top_labels: tuple[str, ...]  # the k most probable class names, most probable first
    top_scores: tuple[float, ...]  # their probabilities


class ImageClassifier:
    """A trained ViT with its class names and preprocessing: encoded images in, predictions out.

    ``top_k`` is capped at the number of classes; ``batch_size`` bounds how many images one forward pass
    takes (memory); ``precision`` as in training (``auto``: bf16 where the hardware has it natively).
    """

    def __init__(self, model: VisionTransformer, class_names: Sequence[str], preprocessing: Mapping[str, object],
                 *, device: str | torch.device = "cpu", precision: PrecisionChoice = "fp32", top_k: int = 5,
                 batch_size: int = 64):
        config = model.config
        height, width = config.image_size
        if height != width:
            raise ValueError(f"ImageClassifier: the model's images are {height}x{width}; "
                             "vitflow's preprocessing (resize, centre crop) makes square ones only")
        if len(class_names) != config.num_classes:
            raise ValueError(f"ImageClassifier: {len(class_names)} class names for a model with {config.num_classes} "
                             "outputs")
        if top_k < 1 or batch_size < 1:
            raise ValueError(f"ImageClassifier: top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, probe(self.device))
        self.model = model.eval().to(self.device)
        self.class_names = list(class_names)
        self.preprocessing = dict(preprocessing)
        self.image_size = height
        self.top_k = min(top_k, len(self.class_names))
        self.batch_size = batch_size
        self.preparer = ImagePreparer(self.preprocessing, height)
        self.normalize = self.preparer.normalize

    @classmethod
    def from_folder(cls, folder: str | Path, **options) -> ImageClassifier:
        """Load the four files of ``MODEL_FILES`` from ``folder`` (a logged model's ``extra_files``, or what
        :func:`write_model_files` wrote). The weights load with ``weights_only=True``: no pickled code runs."""
        folder = Path(folder)
        missing = [name for name in MODEL_FILES[:3] if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{folder} is not a vitflow model: {', '.join(missing)} missing")
        config = ViTConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        model = VisionTransformer(config)
        model.load_state_dict(load_weights_only(folder / WEIGHTS_FILE))
        class_names = json.loads((folder / CLASSES_FILE).read_text())
        preprocessing_file = folder / PREPROCESSING_FILE
        preprocessing = json.loads(preprocessing_file.read_text()) if preprocessing_file.is_file() else {}
        return cls(model, class_names, preprocessing, **options)

    def prepare(self, data: bytes, what: str = "image") -> torch.Tensor:
        """Encoded bytes -> (3, S, S) uint8: decoded, resized and centre-cropped as the model was evaluated
        (the part of preprocessing worth doing where the bytes are, off the model's device; a quarter of the
        float image's size). ``ValueError`` naming ``what`` if the bytes are no image."""
        return self.preparer(data, what)

    def preprocess(self, data: bytes, what: str = "image") -> torch.Tensor:
        """Encoded bytes -> (3, S, S) float, normalised: the model's input."""
        return self.normalize(self.prepare(data, what))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, K) float32 class probabilities on the CPU. uint8 images (from
        :meth:`prepare`) are normalised here; float ones are taken as the model's input (:meth:`preprocess`)."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size].to(self.device, non_blocking=True)
            if batch.dtype == torch.uint8:
                batch = self.normalize(batch)
            with autocast(self.precision, self.device):
                logits = self.model(batch)
            chunks.append(logits.float().softmax(dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.class_names))

    def predictions(self, probabilities: torch.Tensor, top_k: int | None = None) -> list[Prediction]:
        """(B, K) probabilities -> B predictions with the ``top_k`` (default: the classifier's) most probable."""
        top_k = min(top_k or self.top_k, len(self.class_names))
        scores, indices = probabilities.topk(top_k, dim=-1)
        return [Prediction(label=self.class_names[row[0]], score=float(values[0]),
                           top_labels=tuple(self.class_names[i] for i in row), top_scores=tuple(map(float, values)))
                for values, row in zip(scores.tolist(), indices.tolist())]

    def classify(self, images: Sequence[bytes], names: Sequence[str] | None = None,
                 top_k: int | None = None) -> list[Prediction | ValueError]:
        """One result per encoded image, in order: a :class:`Prediction`, or the ``ValueError`` saying why
        that image could not be read (named by ``names[i]``, else ``image i``)."""
        results: list[Prediction | ValueError] = []
        good, tensors = [], []
        for i, data in enumerate(images):
            what = names[i] if names is not None else f"image {i}"
            try:
                tensors.append(self.prepare(data, what=what))
                good.append(i)
                results.append(None)  # filled below
            except ValueError as error:
                results.append(error)
        if tensors:
            for i, prediction in zip(good, self.predictions(self.probabilities(torch.stack(tensors)), top_k)):
                results[i] = prediction
        return results
