"""Listing inputs: the three source types, split and class-name rules, path escapes, local paths and URIs."""

from __future__ import annotations

import shutil

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import Reason
from pipeline.sources import (
    ImageFolderSource,
    ManifestSource,
    ParquetSource,
    SourceError,
    open_source,
)
from tests.pipeline.conftest import CIFAR, FLOWER_CLASSES


def test_image_folder_with_split_folders(flowers_subset):
    scan = ImageFolderSource(str(flowers_subset)).scan()
    assert scan.class_names == FLOWER_CLASSES
    assert {r.split for r in scan.records} == {"train", "test"}
    assert sum(r.split == "train" for r in scan.records) == 24 and not scan.rejected
    record = next(r for r in scan.records if r.source.startswith("test/16_pansy/"))
    assert record.label == 2 and record.file == record.source
    assert scan.mean_bytes > 10_000


def test_image_folder_without_split_folders_is_all_train(tmp_path, flowers_subset):
    shutil.copytree(flowers_subset / "train", tmp_path / "flat")
    (tmp_path / "flat" / "05_iris" / "nested").mkdir()
    shutil.copyfile(
        next((tmp_path / "flat" / "05_iris").glob("*.jpg")), tmp_path / "flat" / "05_iris" / "nested" / "x.JPG"
    )
    scan = ImageFolderSource(str(tmp_path / "flat")).scan()
    assert scan.class_names == FLOWER_CLASSES and {r.split for r in scan.records} == {"train"}
    nested = next(r for r in scan.records if r.source == "05_iris/nested/x.JPG")  # deeper files, upper-case suffix
    assert nested.label == 1


def test_image_folder_quarantines_what_it_cannot_label(bad_corpus):
    scan = ImageFolderSource(str(bad_corpus.root)).scan()
    rejected = {u.source: u.reason for u in scan.rejected}
    assert rejected == {"loose.jpg": Reason.UNKNOWN_LABEL, "flowers/readme.txt": Reason.NOT_AN_IMAGE}
    assert ".DS_Store" not in {r.source for r in scan.records}
    assert scan.class_names == ("flowers", "shapes")


def test_huggingface_parquet_folder(cifar_subset):
    scan = ParquetSource(str(cifar_subset)).scan()
    assert scan.class_names[:3] == ("airplane", "automobile", "bird") and len(scan.class_names) == 10
    assert sum(r.split == "train" for r in scan.records) == 240
    assert sum(r.split == "test" for r in scan.records) == 80
    record = scan.records[0]
    assert record.source == f"{record.file}#{record.row}"
    data = dict((r.source, d) for r, d in ParquetSource(str(cifar_subset)).read(scan.records[::37]))
    assert all(isinstance(d, bytes) and d[:2] == b"\xff\xd8" for d in data.values())


def test_parquet_reads_only_the_rows_asked_for_in_the_order_asked(cifar_subset):
    source = ParquetSource(str(cifar_subset / "train-00000-of-00001.parquet"))
    records = source.scan().records
    picked = [records[200], records[3], records[130]]  # three different row groups, out of order
    table = pq.read_table(cifar_subset / "train-00000-of-00001.parquet")
    for record, data in source.read(picked):
        assert data == table.column("image")[record.row]["bytes"].as_py()


def test_parquet_split_from_file_or_folder_name_and_bad_labels(tmp_path):
    table = pq.read_table(CIFAR / "test-00000-of-00001.parquet").slice(0, 6)
    labels = pa.array([0, 1, None, 12, 2, 3], pa.int64())
    table = table.set_column(table.schema.get_field_index("label"), "label", labels)
    (tmp_path / "data" / "validation").mkdir(parents=True)
    pq.write_table(table, tmp_path / "data" / "validation" / "part0.parquet")
    pq.write_table(table, tmp_path / "data" / "train_0.parquet")
    scan = ParquetSource(str(tmp_path / "data")).scan()
    assert {r.split for r in scan.records} == {"train", "val"}
    reasons = {(u.source, u.reason) for u in scan.rejected}
    assert ("train_0.parquet#2", Reason.UNKNOWN_LABEL) in reasons and (
        "validation/part0.parquet#3",
        Reason.UNKNOWN_LABEL,
    ) in reasons
    assert len(scan.rejected) == 4


def test_parquet_without_metadata_takes_given_or_numbered_class_names(tmp_path):
    table = pq.read_table(CIFAR / "test-00000-of-00001.parquet").slice(0, 20).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "plain.parquet")
    assert ParquetSource(str(tmp_path / "plain.parquet")).scan().class_names == tuple(
        str(i) for i in range(max(table.column("label").to_pylist()) + 1)
    )
    names = tuple("abcdefghij")
    assert ParquetSource(str(tmp_path / "plain.parquet"), names).scan().class_names == names


def test_parquet_with_wrong_columns_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "y": [1]}), tmp_path / "odd.parquet")
    with pytest.raises(SourceError, match=r"odd.parquet: expected columns 'image' and 'label'"):
        ParquetSource(str(tmp_path / "odd.parquet")).scan()


def test_manifest_table_resolves_paths_and_rejects_escapes(tmp_path, flowers_subset):
    shutil.copytree(flowers_subset / "train", tmp_path / "data" / "images")
    (tmp_path / "outside.jpg").write_bytes(b"secret")
    iris = sorted((tmp_path / "data" / "images" / "05_iris").iterdir())
    pansy = sorted((tmp_path / "data" / "images" / "16_pansy").iterdir())
    rows = [
        ("images/05_iris/" + iris[0].name, "iris", "train"),
        (str(iris[1]), "iris", "val"),  # absolute, but inside the folder
        ("./images/../images/16_pansy/" + pansy[0].name, "pansy", "test"),
        ("../outside.jpg", "iris", "train"),
        ("images/../../outside.jpg", "iris", "train"),
        (str(tmp_path / "outside.jpg"), "iris", "train"),
        ("images/16_pansy/" + pansy[1].name, "tulip", "train"),
    ]
    (tmp_path / "data" / "list.csv").write_text("path,label,split\n" + "".join(f"{p},{l},{s}\n" for p, l, s in rows))
    source = open_source(str(tmp_path / "data" / "list.csv"), class_names=["iris", "pansy"])
    assert isinstance(source, ManifestSource)
    scan = source.scan()
    assert [(r.source, r.label, r.split) for r in scan.records] == [
        ("images/05_iris/" + iris[0].name, 0, "train"),
        ("images/05_iris/" + iris[1].name, 0, "val"),
        ("images/16_pansy/" + pansy[0].name, 1, "test"),
    ]
    reasons = [u.reason for u in scan.rejected]
    assert reasons == [Reason.PATH_ESCAPES_ROOT] * 3 + [Reason.UNKNOWN_LABEL]
    assert all(isinstance(d, bytes) for _, d in source.read(scan.records))


def test_manifest_with_index_labels_in_parquet(tmp_path, flowers_subset):
    files = sorted((flowers_subset / "train" / "00_daffodil").iterdir())
    table = pa.table({"path": [str(f.relative_to(flowers_subset)) for f in files[:3]], "label": [0, 2, 1]})
    shutil.copytree(flowers_subset, tmp_path / "copy")
    pq.write_table(table, tmp_path / "copy" / "list.parquet")
    source = open_source(str(tmp_path / "copy" / "list.parquet"))
    assert isinstance(source, ManifestSource)
    scan = source.scan()
    assert scan.class_names == ("0", "1", "2") and [r.label for r in scan.records] == [0, 2, 1]


def test_open_source_tells_the_layouts_apart(flowers_subset, cifar_subset):
    assert isinstance(open_source(str(flowers_subset)), ImageFolderSource)
    assert isinstance(open_source(str(cifar_subset)), ParquetSource)
    assert isinstance(open_source(str(cifar_subset / "test-00000-of-00001.parquet")), ParquetSource)
    with pytest.raises(SourceError, match="/no/such/place: not found"):
        open_source("/no/such/place")


def test_file_uri_and_fsspec_memory_uri(flowers_subset):
    uri_scan = open_source(f"file://{flowers_subset}").scan()
    local_scan = open_source(str(flowers_subset)).scan()
    assert [r.source for r in uri_scan.records] == [r.source for r in local_scan.records]

    memory = fsspec.filesystem("memory")
    for record in local_scan.records[:6]:
        memory.pipe(f"/vitflow-test/{record.source}", (flowers_subset / record.source).read_bytes())
    try:
        source = open_source("memory://vitflow-test")
        scan = source.scan()
        assert {r.source for r in scan.records} == {r.source for r in local_scan.records[:6]}
        assert all(isinstance(d, bytes) and len(d) > 1000 for _, d in source.read(scan.records))
    finally:
        memory.rm("/vitflow-test", recursive=True)
