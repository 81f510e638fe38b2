"""`vitflow export --format onnx`: a registered model as an ONNX file whose logits match PyTorch's to 1e-4 in
onnxruntime, on real photos preprocessed as the model was trained, written locally or to a real object store."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pyarrow.fs as pafs
import pytest
import torch

from tests.cli import run_vitflow
from tests.workflows.conftest import PREPROCESSING
from vit import VisionTransformer, ViTConfig
from vit.export import check_onnx, export_onnx, onnx_metadata
from vit.inference import ImageClassifier


def onnx_logits(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


def test_export_matches_pytorch_on_real_photos(registered, tmp_path):
    out = tmp_path / "exported" / "vit-flowers.onnx"
    result = run_vitflow("export", "models:/vit-flowers@champion", str(out), "--format", "onnx",
                         "--tracking-uri", registered["uri"])
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "logits match PyTorch's" in result.stdout
    model = registered["model"]
    classifier = ImageClassifier(model, registered["classes"], PREPROCESSING)
    images = torch.stack([classifier.preprocess(photo) for photo in registered["photos"]])  # (6, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).numpy()
    for batch in (images[:1], images):  # the batch dimension is dynamic
        np.testing.assert_allclose(onnx_logits(out, batch), expected[: len(batch)], rtol=0, atol=1e-4)
    metadata = onnx_metadata(out)
    assert metadata["class_names"] == registered["classes"] and metadata["preprocessing"] == PREPROCESSING
    assert ViTConfig.from_dict(metadata["vit_config"]) == model.config


def test_the_parity_check_can_fail(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4, pool="avg")
    exported, other = VisionTransformer(config), VisionTransformer(config)
    path = export_onnx(exported, list("abcd"), {}, tmp_path / "a.onnx")
    assert check_onnx(exported, path, batch_sizes=(1, 5)) <= 1e-4
    with pytest.raises(ValueError, match=r"a.onnx: ONNX logits differ from PyTorch's by up to"):
        check_onnx(other, path)


def test_export_to_an_object_store(registered, bucket):
    uri = f"{bucket}/models/vit-flowers.onnx"
    result = run_vitflow("export", "models:/vit-flowers/1", uri, "--format", "onnx", "--tracking-uri", registered["uri"])
    assert result.returncode == 0, result.stderr
    fs, path = pafs.FileSystem.from_uri(uri)
    assert fs.get_file_info(path).size > 10_000
    with fs.open_input_stream(path) as remote:
        data = remote.read()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(["logits"], {"images": images.numpy()})[0],
                                   registered["model"](images).numpy(), rtol=0, atol=1e-4)


def test_export_refuses_what_it_cannot_do(registered, tmp_path):
    uri = registered["uri"]
    result = run_vitflow("export", "models:/vit-flowers/1", str(tmp_path / "m.pt"), "--format", "torchscript",
                         "--tracking-uri", uri)
    assert result.returncode == 2 and "--format must be onnx, got 'torchscript'" in result.stderr
    result = run_vitflow("export", "models:/vit-flowers/1", str(tmp_path), "--format", "onnx", "--tracking-uri", uri)
    assert result.returncode == 2 and "is a folder" in result.stderr
    result = run_vitflow("export", "models:/vit-flowers/9", str(tmp_path / "m.onnx"), "--format", "onnx",
                         "--tracking-uri", uri)
    assert result.returncode == 2 and "vit-flowers/9" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx.tmp-*"))
