"""Datasets in an object store: `vitflow shard` into, resume in, verify and read from a real S3-compatible
server (SeaweedFS, started by the tests), with the same bytes as on a local disk and nothing on the local
disk beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import ShardConfig, read_manifest, verify_shards, write_shards
from pipeline.storage import StorageError
from tests.cli import run_vitflow
from tests.pipeline.test_shards import all_files
from tests.test_cli import vitflow

CONFIG = ShardConfig(max_size=64, val_fraction=0.25, max_shard_samples=24)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, flowers_source) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "flowers"
    write_shards(flowers_source, out, CONFIG, workers=0, progress=False)
    return all_files(out)


def test_shards_land_in_the_bucket_with_the_local_bytes_and_nothing_local(object_store, bucket, flowers_source,
                                                                           local_reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI taken for a path would leave an `s3:` folder here
    uri = f"{bucket}/datasets/flowers"
    result = write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    assert result.info.root == uri and result.num_sharded == 120 and not result.reused
    assert list(tmp_path.iterdir()) == []
    stored = object_store.objects(uri)
    assert stored == local_reference  # shards, manifests, indexes, receipts: byte for byte
    assert {"dataset.json", "manifest.parquet", "quarantine.parquet", "train/wids.json"} <= set(stored)
    assert verify_shards(uri).ok
    assert read_manifest(uri).num_rows == 120
    info = json.loads(stored["dataset.json"])
    assert all(shard["path"].endswith(".tar") for split in info["splits"].values() for shard in split["shards"])

    # Resumed from the bucket: every shard reused; a shard whose receipt is gone is rebuilt, the rest kept.
    again = write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    assert again.built == () and len(again.reused) == len(result.built)
    fs, root = pafs.FileSystem.from_uri(uri)
    fs.delete_file(f"{root}/.vitflow/train-000000.json")
    third = write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    assert third.built == ("train/train-000000.tar",) and object_store.objects(uri) == local_reference


def test_verify_names_a_damaged_object_and_a_missing_one(bucket, flowers_source):
    uri = f"{bucket}/flowers"
    write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    fs, root = pafs.FileSystem.from_uri(uri)
    shard = f"{root}/train/train-000001.tar"
    data = bytearray(fs.open_input_stream(shard).read())
    data[2000] ^= 0xFF  # same size, one byte flipped inside an image
    with fs.open_output_stream(shard) as out:
        out.write(bytes(data))
    fs.delete_file(f"{root}/val/val-000000.tar")
    report = verify_shards(uri)
    assert {(d.path, d.problem) for d in report.damaged} == {
        ("train/train-000001.tar", "sha256 differs from dataset.json"), ("val/val-000000.tar", "missing")}

    verify = run_vitflow("shard", "verify", uri)
    assert verify.returncode == 1, verify.stderr
    assert "damaged: train/train-000001.tar: sha256 differs from dataset.json" in verify.stderr
    assert "damaged: val/val-000000.tar: missing" in verify.stderr


def test_the_cli_shards_into_the_bucket_on_its_own_ray(object_store, bucket, flowers_source, local_reference, tmp_path):
    """The issue's command, with Ray shard tasks (each in its own worker process) writing to the store."""
    uri = f"{bucket}/cli/flowers"
    shard = vitflow("shard", str(flowers_source), uri, "--max-size", "64", "--val-fraction", "0.25",
                    "--shard-samples", "24", "--workers", "2", "--no-progress", cwd=tmp_path)
    assert shard.returncode == 0, shard.stderr[-3000:]
    assert "sharded 120" in shard.stdout
    assert [p.name for p in tmp_path.iterdir()] == []
    assert object_store.objects(uri) == local_reference
    verify = run_vitflow("shard", "verify", uri)
    assert verify.returncode == 0 and f"in {uri} match" in verify.stdout, verify.stderr


def test_a_corpus_in_the_bucket_shards_like_the_local_one(object_store, bucket, flowers_source, local_reference):
    fs, root = pafs.FileSystem.from_uri(bucket)
    for file in sorted(Path(flowers_source).rglob("*")):
        if file.is_file():
            with fs.open_output_stream(f"{root}/corpus/{file.relative_to(flowers_source)}") as out:
                out.write(file.read_bytes())
    uri = f"{bucket}/from-bucket"
    write_shards(f"{bucket}/corpus", uri, CONFIG, workers=0, progress=False)
    stored = object_store.objects(uri)
    # The same shards; only dataset.json's record of where the corpus was differs.
    assert {k: v for k, v in stored.items() if k != "dataset.json"} == \
        {k: v for k, v in local_reference.items() if k != "dataset.json"}
    assert json.loads(stored["dataset.json"])["fingerprint"] == json.loads(local_reference["dataset.json"])["fingerprint"]


def test_a_missing_bucket_is_an_error_naming_it_and_nothing_is_created(object_store, bucket, flowers_source, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-7/flowers: bucket 'no-such-bucket-7' does not exist"):
        write_shards(flowers_source, "s3://no-such-bucket-7/flowers", CONFIG, workers=0, progress=False)
    fs = object_store.filesystem()
    assert fs.get_file_info("no-such-bucket-7").type == pafs.FileType.NotFound  # not created by a write
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError, match="s3://no-such-bucket-7/flowers: bucket 'no-such-bucket-7' does not exist"):
        verify_shards("s3://no-such-bucket-7/flowers")


def test_wrong_credentials_and_an_unreachable_store_are_errors_naming_the_uri(bucket, flowers_source, monkeypatch):
    uri = f"{bucket}/flowers"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=rf"{uri}: cannot reach its store: .*ACCESS_DENIED") as error:
        write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    assert "not-the-secret" not in str(error.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageError, match=rf"{uri}: cannot reach its store: .*NETWORK_CONNECTION"):
        write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    verify = run_vitflow("shard", "verify", uri)
    assert verify.returncode == 1 and f"error: {uri}: cannot reach its store: " in verify.stderr, verify.stderr
    assert "Traceback" not in verify.stderr


def test_vit_reads_the_dataset_from_the_bucket(bucket, flowers_source, local_reference, tmp_path):
    from vit.data import DataConfig, eval_loader, read_dataset_index

    uri = f"{bucket}/read/flowers"
    write_shards(flowers_source, uri, CONFIG, workers=0, progress=False)
    local = tmp_path / "flowers"
    for name, data in local_reference.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    remote_index, local_index = read_dataset_index(uri), read_dataset_index(local)
    assert remote_index.fingerprint == local_index.fingerprint and remote_index.root == uri
    config = DataConfig(batch_size=8, num_workers=0, image_size=32, crop_pct=1.0)

    def labels(root) -> list[int]:
        return [int(y) for batch in eval_loader(str(root), config, rank=0, world_size=1, split="test") for y in batch[1]]

    assert labels(uri) == labels(local) and len(labels(uri)) == 24


def test_the_patient_filesystem_round_trips_folders_and_pickles_without_credentials(object_store, bucket, tmp_path):
    """What Ray Train persists checkpoints through: a folder copied in and back byte for byte, listed and
    deleted; pickled (Ray ships it to every worker) as its URI and budget, never the store's keys."""
    import pickle

    from pipeline.storage import PatientHandler, patient_filesystem

    source = tmp_path / "checkpoint_000"
    (source / "sub").mkdir(parents=True)
    (source / "model.pt").write_bytes(bytes(range(256)) * 5000)
    (source / "sub" / "state.json").write_text('{"step": 20}')
    fs, root = patient_filesystem(f"{bucket}/runs", budget_s=7)
    assert isinstance(fs, pafs.PyFileSystem) and root == bucket.removeprefix("s3://") + "/runs"
    pafs.copy_files(str(source), f"{root}/checkpoint_000", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert object_store.objects(f"{bucket}/runs") == {"checkpoint_000/model.pt": (source / "model.pt").read_bytes(),
                                                      "checkpoint_000/sub/state.json": b'{"step": 20}'}

    shipped = pickle.dumps(fs)
    assert object_store.secret_key.encode() not in shipped and object_store.access_key.encode() not in shipped
    copy = pickle.loads(shipped)
    assert copy.handler == PatientHandler(f"{bucket}/runs", 7) and copy.equals(fs)
    back = tmp_path / "back"
    pafs.copy_files(f"{root}/checkpoint_000", str(back), source_filesystem=copy, destination_filesystem=pafs.LocalFileSystem())
    assert (back / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    assert (back / "sub" / "state.json").read_text() == '{"step": 20}'
    listed = copy.get_file_info(pafs.FileSelector(root, recursive=True))
    assert sorted(i.path.removeprefix(root + "/") for i in listed if i.type == pafs.FileType.File) == [
        "checkpoint_000/model.pt", "checkpoint_000/sub/state.json"]
    with pytest.raises(StorageError, match="cannot append"):
        copy.open_append_stream(f"{root}/checkpoint_000/model.pt")
    copy.delete_dir(f"{root}/checkpoint_000")
    assert object_store.objects(f"{bucket}/runs") == {}
    local, path = patient_filesystem(str(tmp_path / "runs"))
    assert isinstance(local, pafs.LocalFileSystem) and path == str(tmp_path / "runs")  # local folders as they are
