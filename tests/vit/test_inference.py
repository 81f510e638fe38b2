"""vit.inference: encoded real photos in, the model's own preprocessing applied, probabilities and top-k out;
bad images answered in their place without losing the good ones."""

import datetime

import pytest
import torch
from PIL import Image

from vit import VisionTransformer, ViTConfig
from vit.inference import MODEL_FILES, ImageClassifier, write_model_files

PREPROCESSING = {"image_size": 32, "mean": [0.45, 0.40, 0.35], "std": [0.22, 0.21, 0.20], "crop_pct": 0.8}
CLASSES = ["daisy", "iris", "tulip", "rose", "lily"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=len(CLASSES))).eval()


@pytest.fixture(scope="module")
def photos(datasets_dir):
    """Six real Flowers-17 JPEGs of different sizes, as their encoded bytes."""
    files = sorted((datasets_dir / "flowers17" / "train").glob("*/*.jpg"))[:6]
    return [file.read_bytes() for file in files]


def by_hand(data: bytes) -> torch.Tensor:
    """The preprocessing the classifier should apply, written out with PIL: the shorter side to
    32 / 0.8 = 40 px (the longer one truncated, as torchvision sizes it), the centre 32 x 32, scaled to
    [0, 1], normalised with the model's own mean and std."""
    import io

    import numpy as np

    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    size = (40, int(40 * height / width)) if width <= height else (int(40 * width / height), 40)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((image.width - 32) / 2)), int(round((image.height - 32) / 2))
    pixels = torch.from_numpy(np.asarray(image.crop((left, top, left + 32, top + 32)), dtype=np.float32))
    mean, std = torch.tensor(PREPROCESSING["mean"]).view(3, 1, 1), torch.tensor(PREPROCESSING["std"]).view(3, 1, 1)
    return (pixels.permute(2, 0, 1) / 255 - mean) / std


def test_predictions_apply_the_models_preprocessing(model, photos):
    classifier = ImageClassifier(model, CLASSES, PREPROCESSING, top_k=3)
    results = classifier.classify(photos)
    assert len(results) == len(photos)
    for data, result in zip(photos, results):
        expected = by_hand(data)
        seen = classifier.preprocess(data)
        # PIL's and torchvision's antialiased bilinear resizes differ by a level here and there; the wrong
        # mean or std (ImageNet's) would move every pixel by 0.15 or more
        assert seen.shape == (3, 32, 32) and (seen - expected).abs().mean() < 0.01, (seen - expected).abs().mean()
        with torch.no_grad():
            probabilities = model(seen[None]).softmax(-1)[0]
        top = probabilities.topk(3)
        assert result.top_labels == tuple(CLASSES[i] for i in top.indices)
        assert result.top_scores == pytest.approx(top.values.tolist(), abs=1e-6)
        assert result.label == result.top_labels[0] and result.score == result.top_scores[0]
        assert list(result.top_scores) == sorted(result.top_scores, reverse=True)


def test_a_bad_image_is_answered_in_its_place(model, photos):
    classifier = ImageClassifier(model, CLASSES, PREPROCESSING)
    truncated = photos[1][: len(photos[1]) // 3]
    images = [photos[0], b"GIF89a not really", truncated, photos[2], None]
    results = classifier.classify(images, names=["a.jpg", "b.gif", "c.jpg", "d.jpg", "e"])
    assert [type(r).__name__ for r in results] == ["Prediction", "ValueError", "ValueError", "Prediction", "ValueError"]
    assert "b.gif" in str(results[1]) and "c.jpg" in str(results[2]) and "e is not encoded image bytes" in str(results[4])
    # the good ones are what they would be alone (fp32: the same arithmetic whatever the batch)
    alone = classifier.classify([photos[0], photos[2]])
    assert [results[0], results[3]] == alone


def test_batches_and_top_k(model, photos):
    one_pass = ImageClassifier(model, CLASSES, PREPROCESSING, batch_size=64).classify(photos)
    in_pairs = ImageClassifier(model, CLASSES, PREPROCESSING, batch_size=2).classify(photos)
    for a, b in zip(one_pass, in_pairs):
        assert a.top_labels == b.top_labels
        assert a.top_scores == pytest.approx(b.top_scores, abs=1e-6)
    capped = ImageClassifier(model, CLASSES, PREPROCESSING, top_k=50).classify(photos[:1])[0]
    assert sorted(capped.top_labels) == sorted(CLASSES) and sum(capped.top_scores) == pytest.approx(1, abs=1e-5)
    assert len(ImageClassifier(model, CLASSES, PREPROCESSING).classify(photos[:1], top_k=2)[0].top_labels) == 2
    assert ImageClassifier(model, CLASSES, PREPROCESSING).classify([]) == []


def test_model_files_round_trip(model, photos, tmp_path):
    paths = write_model_files(tmp_path / "model", model, CLASSES, PREPROCESSING)
    assert [p.name for p in paths] == list(MODEL_FILES) and all(p.is_file() for p in paths)
    loaded = ImageClassifier.from_folder(tmp_path / "model")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    assert loaded.class_names == CLASSES and loaded.preprocessing == PREPROCESSING
    assert loaded.classify(photos[:2]) == ImageClassifier(model, CLASSES, PREPROCESSING).classify(photos[:2])
    (tmp_path / "model" / "class_names.json").unlink()
    with pytest.raises(ValueError, match=r"model is not a vitflow model: class_names.json missing"):
        ImageClassifier.from_folder(tmp_path / "model")


def test_wrong_construction_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="4 class names for a model with 5 outputs"):
        ImageClassifier(model, CLASSES[:4], PREPROCESSING)
    with pytest.raises(ValueError, match="top_k and batch_size must be >= 1"):
        ImageClassifier(model, CLASSES, PREPROCESSING, top_k=0)
    wide = VisionTransformer(ViTConfig(image_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5))
    with pytest.raises(ValueError, match="32x48"):
        ImageClassifier(wide, CLASSES, PREPROCESSING)
    # weights that would run code are refused before they do (vit.checkpoint.load_weights_only)
    write_model_files(tmp_path / "evil", model, CLASSES, PREPROCESSING)
    torch.save({"x": datetime.date(2020, 1, 1)}, tmp_path / "evil" / "weights.pt")
    with pytest.raises(ValueError, match="refused to load"):
        ImageClassifier.from_folder(tmp_path / "evil")
