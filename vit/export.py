"""A trained ViT as an ONNX file, checked against PyTorch before it is handed over.

``torch.onnx.export`` does the conversion (its ``torch.export``-based exporter, which needs ``onnxscript``),
with a dynamic batch dimension: the file takes ``(N, 3, S, S)`` float images, preprocessed as the model was
trained, and returns ``(N, K)`` logits. What the conversion leaves out and this module adds: the model's
class names, preprocessing (resolution, mean, std, centre crop) and ``ViTConfig`` travel inside the file
(ONNX ``metadata_props``: ``vitflow.class_names``, ``vitflow.preprocessing``, ``vitflow.vit_config``, JSON),
so the file alone is a usable model; and :func:`check_onnx` runs the written file with ``onnxruntime`` and
compares its logits with the PyTorch model's on the same inputs at several batch sizes.

The ONNX tools are an optional extra: ``pip install 'vitflow[onnx]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from vit.model import VisionTransformer

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INSTALL_HINT = "pip install 'vitflow[onnx]'"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX export needs {module}, which is not installed: {INSTALL_HINT}") from None


def export_onnx(model: VisionTransformer, class_names: Sequence[str], preprocessing: Mapping[str, object],
                path: str | Path, *, opset: int = OPSET) -> Path:
    """Write ``model`` (in eval mode, fp32, on the CPU) to ``path`` as ONNX with its metadata; returns the path."""
    _require("onnxscript")
    onnx = _require("onnx")
    path = Path(path)
    model = model.eval().cpu().float()
    height, width = model.config.image_size
    example = torch.randn(2, model.config.in_chans, height, width)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}}, external_data=False,
                                verbose=False)
    proto = program.model_proto
    metadata = {"vitflow.class_names": json.dumps(list(class_names)),
                "vitflow.preprocessing": json.dumps(dict(preprocessing)),
                "vitflow.vit_config": json.dumps(model.config.to_dict())}
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def onnx_metadata(path: str | Path) -> dict[str, object]:
    """The vitflow metadata of an exported file: class_names, preprocessing, vit_config."""
    onnx = _require("onnx")
    props = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    return {key.removeprefix("vitflow."): json.loads(value) for key, value in props.items() if key.startswith("vitflow.")}


def check_onnx(model: VisionTransformer, path: str | Path, *, batch_sizes: Sequence[int] = (1, 3),
               atol: float = 1e-4, seed: int = 0) -> float:
    """Run ``path`` with onnxruntime (CPU) on random images and compare its logits with ``model``'s (fp32):
    returns the largest absolute difference; ``ValueError`` past ``atol``."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.eval().cpu().float()
    height, width = model.config.image_size
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for size in batch_sizes:
        images = torch.randn(size, model.config.in_chans, height, width, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        if got.shape != expected.shape:
            raise ValueError(f"{path}: logits of shape {got.shape} for a batch of {size}, expected {expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
    if worst > atol:
        raise ValueError(f"{path}: ONNX logits differ from PyTorch's by up to {worst:.2e} (allowed {atol:.0e})")
    return worst
