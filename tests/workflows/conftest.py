"""Fixtures for the workflow tests: a real local Ray (the corpora, shards and a finished workflow they
share with the other suites are in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

from tests.raydir import short_ray_tmpdir

PREPROCESSING = {"image_size": 32, "mean": [0.45, 0.40, 0.35], "std": [0.22, 0.21, 0.20], "crop_pct": 0.875}


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs, its state in a short temp dir of its own (``tests.raydir``); shut down,
    and RAY_TMPDIR restored, afterwards."""
    import ray

    # A loaded machine (CI, or a benchmark beside the tests) can take over Ray Train's default 60 s to
    # start a worker group (each worker imports torch); the controller reads this at start.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    from workflows.compute.local_ray import TRIAL_DRIVER_RESOURCE

    with short_ray_tmpdir() as temp:
        ray.init(num_cpus=2, resources={TRIAL_DRIVER_RESOURCE: 2}, include_dashboard=True, _temp_dir=temp,
                 logging_level="WARNING")
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def registered(tmp_path_factory, datasets_dir):
    """`vit-flowers` version 1 (alias champion) in a real store: a small ViT over 17 Flowers classes whose
    head is scaled so its classes stand apart (answers compare across processes, not only to the last bit)."""
    import torch
    from mlflow.tracking import MlflowClient

    from vit import VisionTransformer, ViTConfig
    from vit.inference import ImageClassifier
    from workflows import tracking

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    classes = sorted(p.name for p in (datasets_dir / "flowers17" / "train").iterdir())
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                        num_classes=len(classes))).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 2.0)
    tracking.ensure_experiment("serving", uri, artifact_location=(root / "artifacts").as_uri())
    run_id = tracking.start_run(uri, "serving", "train")
    logged = tracking.log_vit_model(uri, run_id, model, classes, preprocessing=PREPROCESSING)
    version = tracking.register_model(uri, logged.model_uri, "vit-flowers", {}, run_id)
    tracking.end_run(uri, run_id)
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias("vit-flowers", "champion", version)
    photos = [file.read_bytes() for file in sorted((datasets_dir / "flowers17" / "test").glob("*/*.jpg"))[::17][:6]]
    expected = ImageClassifier(model, classes, PREPROCESSING, precision="auto", top_k=len(classes)).classify(photos)
    return {"uri": uri, "root": root, "version": version, "photos": photos, "expected": expected, "classes": classes,
            "model": model}
