"""Fault: the object store goes away while sharding into it, and while pre-training checkpoints into it. A
real SeaweedFS of the test's own is killed (SIGKILL, as a crashed server) after the first shard (or
checkpoint) has landed and started again 30 s later on the same folder and ports. The sharding waits it
out and finishes with the bytes of an undisturbed run; with a retry budget shorter than the outage it fails
naming the URI, presents nothing unfinished as a dataset, and the same command after the store is back
reuses the shards that were finished. Pre-training waits with its checkpoint upload and finishes every
step, each checkpoint in the store whole; an upload past the budget fails naming the URI and leaves no
object behind."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import ShardConfig, verify_shards, write_shards
from pipeline.storage import RETRY_ENV, StorageError
from tests.objectstore import SeaweedFS
from tests.pipeline.test_shards import all_files

pytestmark = pytest.mark.slow

CONFIG = ShardConfig(max_size=64, val_fraction=0.25, max_shard_samples=8)
OUTAGE_S = 30


@pytest.fixture
def store(monkeypatch):
    store = SeaweedFS(Path(tempfile.mkdtemp(prefix="vitflow-s3-outage-", dir="/tmp")))
    store.start()
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    yield store
    store.stop(kill=True)


def receipts(store: SeaweedFS, uri: str) -> list[str]:
    """The shard receipts under ``uri`` (listed, not read)."""
    fs, root = store.filesystem(), uri.removeprefix("s3://")
    listed = fs.get_file_info(pafs.FileSelector(f"{root}/.vitflow", allow_not_found=True))
    return [info.base_name for info in listed if info.base_name != "writer.json"]


def shard_in_background(source: Path, uri: str) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = write_shards(source, uri, CONFIG, workers=0, progress=False)
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for_first_shard(store: SeaweedFS, uri: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 300
    while not receipts(store, uri):
        assert thread.is_alive() and time.monotonic() < deadline, "no shard landed before the outage"
        time.sleep(0.05)


def test_sharding_waits_out_a_30_second_outage_and_writes_the_same_bytes(store, flowers_source, tmp_path, monkeypatch):
    reference = tmp_path / "local"
    write_shards(flowers_source, reference, CONFIG, workers=0, progress=False)
    uri = store.create_bucket("outage") + "/flowers"
    monkeypatch.setenv(RETRY_ENV, "180")
    thread, box = shard_in_background(flowers_source, uri)
    wait_for_first_shard(store, uri, thread)
    store.stop(kill=True)
    down_at = time.monotonic()
    time.sleep(OUTAGE_S)
    assert thread.is_alive(), "the sharding ended during the outage"  # it waits, neither finishing nor failing
    store.start()
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    took = time.monotonic() - down_at
    assert verify_shards(uri).ok
    assert store.objects(uri) == all_files(reference)  # nothing partial kept: byte for byte an undisturbed run
    print(f"\nRELIABILITY object store down {OUTAGE_S} s mid-sharding: waited, finished {took - OUTAGE_S:.0f} s after "
          f"it came back; {len(box['result'].built)} shards, all verified")


def test_past_the_retry_budget_the_error_names_the_uri_and_a_rerun_resumes(store, flowers_source, monkeypatch):
    uri = store.create_bucket("budget") + "/flowers"
    monkeypatch.setenv(RETRY_ENV, "5")
    thread, box = shard_in_background(flowers_source, uri)
    wait_for_first_shard(store, uri, thread)
    store.stop(kill=True)
    thread.join(120)
    assert not thread.is_alive()
    error = box.get("error")
    assert isinstance(error, StorageError), error
    assert str(error).startswith(f"{uri}: cannot write ") and "still failing after 5 s of retries" in str(error)
    store.start()
    fs, root = pafs.FileSystem.from_uri(uri)
    assert fs.get_file_info(f"{root}/dataset.json").type == pafs.FileType.NotFound  # nothing presented as done
    finished = len(receipts(store, uri))
    monkeypatch.setenv(RETRY_ENV, "60")
    result = write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    assert len(result.reused) == finished >= 1 and verify_shards(uri).ok


def test_pretraining_waits_out_a_30_second_outage_while_checkpointing(store, cifar_shards, tmp_path, monkeypatch):
    """Ray Train persists checkpoints (and its run state) through the store; the shards and MLflow are
    local, so the outage hits checkpointing alone. The worker's upload waits for the store and the run
    finishes all its steps, resumed from nothing: no step is logged twice, and every checkpoint in the
    store is whole."""
    from mlflow.tracking import MlflowClient

    from tests.faults.test_training_faults import in_background, settings
    from workflows.compute.local_ray import embedded_ray
    from workflows.compute.training import checkpoint_step
    from workflows.stages.pretrain import run_pretrain

    monkeypatch.setenv(RETRY_ENV, "180")
    runs = store.create_bucket("ckpt-outage") + "/runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = settings(tmp_path, cifar_shards, "store-outage", uri, steps=40, checkpoint_every=10, register_as=None,
                      storage_path=runs, max_failures=0)

    def pretrain():
        with embedded_ray(tmp_path / "work", num_cpus=2):  # started here: its workers get the store's settings
            return run_pretrain(config)

    join = in_background(pretrain)
    fs = store.filesystem()
    listed = lambda: fs.get_file_info(pafs.FileSelector(runs.removeprefix("s3://"), recursive=True, allow_not_found=True))  # noqa: E731
    deadline = time.monotonic() + 600
    while not any("/checkpoint_" in info.path for info in listed()):
        assert time.monotonic() < deadline, "no checkpoint reached the store"
        time.sleep(0.1)
    store.stop(kill=True)
    down_at = time.time()
    time.sleep(OUTAGE_S)
    store.start()
    result = join(600)
    back_after = time.time() - down_at - OUTAGE_S

    assert result.metrics["step"] == 40
    losses = MlflowClient(uri).get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(5, 41, 5))  # every step once: nothing redone, nothing lost
    logged_in_outage = [m.step for m in losses if down_at < m.timestamp / 1000 < down_at + OUTAGE_S]
    assert max(logged_in_outage, default=0) < 40  # the training waited for its checkpoint upload ...
    assert max(m.timestamp for m in losses) / 1000 > down_at + OUTAGE_S  # ... and went on once the store was back
    stored = store.objects(runs)
    folders = sorted({k.split("/")[1] for k in stored if k.count("/") >= 2 and k.split("/")[1].startswith("checkpoint_")})
    assert folders
    for folder in folders:  # whole: each loads, and holds a step the run reached
        with tempfile.TemporaryDirectory() as scratch:
            for key, data in stored.items():
                if key.startswith(f"store-outage/{folder}/"):
                    file = Path(scratch) / key.removeprefix(f"store-outage/{folder}/")
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_bytes(data)
            assert checkpoint_step(scratch) in (10, 20, 30, 40)
    print(f"\nRELIABILITY object store down {OUTAGE_S} s while pre-training checkpoints: the upload waited; the run "
          f"finished all 40 steps {back_after:.0f} s after the store came back, no step redone; "
          f"{len(folders)} checkpoint(s) in the store, each whole")


def test_an_upload_past_the_retry_budget_names_the_uri_and_leaves_no_object(store, tmp_path):
    from pipeline.storage import patient_filesystem

    runs = store.create_bucket("ckpt-budget") + "/runs"
    fs, root = patient_filesystem(runs, budget_s=3)
    (tmp_path / "checkpoint_000").mkdir()
    (tmp_path / "checkpoint_000" / "model.pt").write_bytes(b"x" * 1_000_000)
    store.stop(kill=True)
    started = time.monotonic()
    with pytest.raises(OSError, match=rf"{runs}/checkpoint_000/model.pt: cannot write it \(still failing after 3 s"):
        pafs.copy_files(str(tmp_path / "checkpoint_000"), f"{root}/checkpoint_000",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert time.monotonic() - started < 30  # bounded: the budget, not pyarrow's or the OS's own timeouts
    store.start()
    assert store.objects(runs) == {}  # nothing partial
