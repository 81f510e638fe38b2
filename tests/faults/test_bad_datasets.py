"""Bad datasets (issue 7): zero images, one class, labels out of range, class maps that disagree between
splits or with the model. Each fails with an error naming the dataset and the problem before training
starts: at sharding where the source already shows it (``pipeline``), else in ``vit.data.check_dataset``,
which the pre-training and fine-tuning stages call before they touch MLflow or Ray. The datasets are real
Flowers-17 photos sharded by the real pipeline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import ShardConfig, write_shards
from tests.conftest import DATASETS
from vit.data import DatasetError, check_dataset, read_dataset_index, train_loader
from workflows.compute.local_ray import temp_root

pytestmark = pytest.mark.slow

VITFLOW = str(Path(sys.executable).parent / "vitflow")
FLOWERS = DATASETS / "flowers17"
PHOTO_CLASSES = sorted(p.name for p in (FLOWERS / "train").iterdir())


def image_folder(root: Path, layout: dict[str, int], broken: tuple[str, ...] = ()) -> Path:
    """``layout``: "split/class" -> that many real photos (of a different Flowers-17 class per folder name);
    ``broken``: "split/class/name.jpg" files holding text instead of a picture."""
    for folder, count in layout.items():
        split, name = folder.split("/")
        photos = sorted((FLOWERS / split / PHOTO_CLASSES[ord(name[0]) % len(PHOTO_CLASSES)]).iterdir())[:count]
        (root / folder).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            shutil.copyfile(photo, root / folder / photo.name)
    for path in broken:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("not a picture\n")
    return root


def shard(source: Path, out: Path):
    return write_shards(source, out, ShardConfig(max_size=48), workers=0, progress=False)


def shard_cli(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([VITFLOW, "shard", str(source), str(out), "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def check(root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as failure:
        check_dataset(read_dataset_index(root), **{"train_split": "train", "eval_splits": ["test"], **kwargs})
    message = str(failure.value)
    assert message.startswith(f"dataset {root} cannot be trained on: "), message
    return message


def test_zero_images_fail_at_sharding_naming_the_source(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    result = shard_cli(empty, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {empty}: no images to shard (the source lists no inputs)" in result.stderr
    assert not (tmp_path / "out").exists()

    unusable = image_folder(tmp_path / "unusable", {}, broken=("a/one.jpg", "b/two.png"))
    (unusable / "a" / "empty.jpg").write_bytes(b"")
    result = shard_cli(unusable, tmp_path / "out2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (f"error: {unusable}: none of the 3 inputs could be used (empty 1, not_an_image 2); "
            f"see {tmp_path / 'out2' / 'quarantine.parquet'}") in result.stderr.replace("\n", "")
    assert not (tmp_path / "out2" / "dataset.json").exists()  # nothing presented as a dataset


def test_a_split_with_no_images_is_refused_before_training(tmp_path):
    source = image_folder(tmp_path / "src", {"train/a": 4, "train/b": 4}, broken=("test/a/x.jpg", "test/b/y.jpg"))
    out = tmp_path / "out"
    shard(source, out)
    assert read_dataset_index(out).splits["test"].num_samples == 0
    assert "split 'test' has no images" in check(out)


def test_one_class_is_refused_before_training(tmp_path):
    out = tmp_path / "out"
    shard(image_folder(tmp_path / "src", {"train/a": 4, "test/a": 2}), out)
    assert "it has 1 class ['a']: a classifier needs at least 2" in check(out)


def test_a_training_split_of_one_class_and_eval_classes_it_lacks(tmp_path):
    """Two class folders, but every training image of class b is broken: train holds one class, test holds
    a class the model would never see in training."""
    source = image_folder(tmp_path / "src", {"train/a": 4, "test/a": 2, "test/b": 2}, broken=("train/b/x.jpg",))
    out = tmp_path / "out"
    shard(source, out)
    message = check(out)
    assert "split 'train' has images of only one class ['a']" in message
    assert "split 'test' has images of classes that split 'train' has none of: ['b']" in message


def test_split_class_folders_that_disagree_fail_at_sharding(tmp_path):
    source = image_folder(tmp_path / "src", {"train/a": 2, "train/b": 2, "test/a": 1, "test/c": 1})
    result = shard_cli(source, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {source}: split 'test' has class folders that train lacks: ['c']" in result.stderr


def test_labels_outside_the_class_map_are_refused_before_training(tmp_path):
    """A downstream set relabelled by hand: a class dropped from dataset.json but not from the shards.
    Without the check, training would meet every such sample as a corrupt one, mid-run."""
    out = tmp_path / "out"
    shard(image_folder(tmp_path / "src", {f"{s}/{c}": n for s, n in (("train", 3), ("test", 1)) for c in "abc"}), out)
    doc = json.loads((out / "dataset.json").read_text())
    doc["class_names"], doc["num_classes"] = ["a", "b"], 2
    for split in doc["splits"].values():
        split["counts"].pop("c")
        split["num_samples"] = sum(s["num_samples"] for s in split["shards"])
    (out / "dataset.json").write_text(json.dumps(doc))
    message = check(out)
    assert "labels [2] outside 0..1 (2 classes): labels out of range" in message and "['test', 'train']" in message

    doc["class_names"], doc["num_classes"] = ["b", "a", "c"], 3  # same size, names swapped
    for split in doc["splits"].values():
        split["counts"]["c"] = 0
    (out / "dataset.json").write_text(json.dumps(doc))
    assert re.search(r"label [01] is '[ab]' in manifest\.parquet but '[ab]' in dataset\.json: the class maps differ",
                     check(out))


def test_a_model_with_another_class_map_is_refused(tmp_path):
    out = tmp_path / "out"
    shard(image_folder(tmp_path / "src", {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1}), out)
    check_dataset(read_dataset_index(out), train_split="train", eval_splits=["test"], class_names=["a", "b"])
    message = check(out, class_names=["a", "b", "c"])
    assert "the model's head predicts 3 classes ['a', 'b', 'c'], the dataset has 2 ['a', 'b']" in message
    assert "no split 'val' (have ['test', 'train'])" in check(out, eval_splits=["val"])


@pytest.fixture
def one_class(tmp_path) -> Path:
    out = tmp_path / "one-class"
    shard(image_folder(tmp_path / "src", {"train/a": 4, "test/a": 2}), out)
    return out


def test_the_pretraining_stage_refuses_before_mlflow_or_ray(one_class, tmp_path):
    import ray

    from workflows.stages.pretrain import PretrainConfig, run_pretrain

    store = tmp_path / "mlflow.db"
    config = PretrainConfig.model_validate({
        "name": "bad-data", "dataset": str(one_class), "val_split": "test", "storage_path": str(tmp_path / "runs"),
        "model": {"variant": "Ti/16", "image_size": 32}, "train": {"total_steps": 1},
        "tracking": {"uri": f"sqlite:///{store}"},
    })
    with pytest.raises(DatasetError, match=r"one-class cannot be trained on: it has 1 class \['a'\]"):
        run_pretrain(config)
    assert not ray.is_initialized() and not store.exists() and not (tmp_path / "runs").exists()


def test_the_finetuning_stage_refuses_before_loading_the_model(one_class, tmp_path):
    import ray

    from workflows.stages.finetune import FinetuneSearchConfig, run_finetune

    store = tmp_path / "mlflow.db"
    config = FinetuneSearchConfig.model_validate({
        "name": "bad-data", "dataset": str(one_class), "val_split": "test", "test_split": "test",
        "pretrained": "models:/vit-pretrained/1", "storage_path": str(tmp_path / "runs"),
        "train": {"total_steps": 2, "eval_every": 1, "checkpoint_every": 1},
        "search": {"image_size": [32], "lr": {"min": 0.001, "max": 0.01}},
        "tracking": {"uri": f"sqlite:///{store}"},
    })
    with pytest.raises(DatasetError, match=r"one-class cannot be trained on: it has 1 class \['a'\]"):
        run_finetune(config)
    assert not ray.is_initialized() and not store.exists()


def test_the_pretrain_command_reports_it_without_a_traceback(one_class, tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bad-data", "dataset": str(one_class), "val_split": "test", "storage_path": str(tmp_path / "runs"),
        "model": {"variant": "Ti/16", "image_size": 32}, "train": {"total_steps": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }))
    result = subprocess.run([VITFLOW, "pretrain", str(config)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"dataset {one_class} cannot be trained on: it has 1 class ['a']" in result.stderr.replace("\n", "")
    assert not temp_root(tmp_path / "runs").exists()  # refused before any Ray was started for the stage


def test_the_loader_alone_would_only_notice_mid_training(one_class, tmp_path):
    """Why the check is needed: the loader itself happily serves a one-class dataset."""
    from tests.vit.test_loop import data_config

    loader = train_loader(one_class, data_config(batch_size=2, image_size=32), rank=0, world_size=1)
    assert {int(label) for batch in loader for label in batch.targets} == {0}


def test_resuming_on_data_with_another_class_map_is_refused(tmp_path):
    """A checkpoint's head belongs to the classes it was trained on: resuming it on data whose classes
    differ (same count, so the weights would load) fails before a step is taken."""
    from tests.vit.test_loop import Recorder, data_config, tiny_model
    from vit.loop import TrainConfig, fit

    first, second = tmp_path / "ab", tmp_path / "ac"
    shard(image_folder(tmp_path / "src-ab", {"train/a": 2, "train/b": 2}), first)
    shard(image_folder(tmp_path / "src-ac", {"train/a": 2, "train/c": 2}), second)
    data = data_config(batch_size=2)
    fit(tiny_model(num_classes=2), train_loader(first, data, rank=0, world_size=1), None,
        TrainConfig(total_steps=1, log_every=1), report=Recorder(), checkpoint_dir=tmp_path / "ckpt",
        metadata={"class_names": list(read_dataset_index(first).class_names)})
    report = Recorder()
    with pytest.raises(DatasetError, match=r"step-000001: the checkpoint's head predicts 2 classes \['a', 'b'\], "
                                           r"the data has 2 \['a', 'c'\]: the class maps differ"):
        fit(tiny_model(num_classes=2), train_loader(second, data, rank=0, world_size=1), None,
            TrainConfig(total_steps=2, log_every=1), report=report, resume_from=tmp_path / "ckpt" / "step-000001",
            metadata={"class_names": list(read_dataset_index(second).class_names)})
    assert report.calls == []
