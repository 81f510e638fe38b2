"""Fault: the object store goes away while sharding into it. A real SeaweedFS of the test's own is killed
(SIGKILL, as a crashed server) after the first shard has landed and started again 30 s later on the same
folder and ports. The sharding waits it out and finishes with the bytes of an undisturbed run; with a retry
budget shorter than the outage it fails naming the URI, presents nothing unfinished as a dataset, and the
same command after the store is back reuses the shards that were finished."""

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
