"""Batch prediction (`vitflow predict`, workflows.stages.predict) on a real local Ray: a registered model, real
Flowers-17 photos in a folder, a Parquet table and shards, bad images planted among them, the output read back;
through the CLI, from and to a real S3 bucket."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.storage import StorageError
from tests.cli import run_vitflow
from workflows import tracking
from workflows.compute import predict
from workflows.configs import PredictConfig
from workflows.stages.predict import run_predict


def config(registered, source, out, **changes) -> PredictConfig:
    return PredictConfig(model="models:/vit-flowers@champion", source=str(source), out=str(out),
                         tracking={"uri": registered["uri"], "experiment": "predict"}, **changes)


def check_row(row: dict, expected, k: int = 5) -> None:
    """A good row is what ``ImageClassifier`` answers for the same photo (bf16 where the CPU has it: near-ties
    in the top k may swap, scores agree to its rounding)."""
    assert row["error"] is None and row["label"] == expected.label, row
    assert row["score"] == pytest.approx(expected.score, abs=3e-3)
    assert len(row["top_labels"]) == len(row["top_scores"]) == k and row["top_labels"][0] == row["label"]
    probability = dict(zip(expected.top_labels, expected.top_scores))
    for label, score in zip(row["top_labels"], row["top_scores"]):
        assert score == pytest.approx(probability[label], abs=3e-3), label


@pytest.fixture(scope="module")
def photo_folder(registered, tmp_path_factory):
    """Six real photos at several depths, and four files that are not usable images."""
    root = tmp_path_factory.mktemp("photos")
    names = ["a.jpg", "garden/b.jpg", "garden/c.jpg", "garden/beds/d.jpg", "e.jpg", "f.JPG"]
    for name, photo in zip(names, registered["photos"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(photo)
    (root / "garden" / "cut.jpg").write_bytes(registered["photos"][0][:300])  # truncated
    (root / "notes.jpg").write_bytes(b"not an image at all")
    (root / "README.txt").write_text("photos from the garden")
    (root / "empty.png").write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"skipped: a hidden folder")
    return root, dict(zip(names, registered["expected"]))


def test_the_cli_reads_from_and_writes_to_a_bucket(registered, photo_folder, bucket, object_store, tmp_path):
    """First in the module: the CLI starts its own Ray (inheriting the bucket's credentials), before the
    module's local Ray is up."""
    root, expected = photo_folder
    fs = object_store.filesystem()
    photos = bucket.removeprefix("s3://") + "/photos"
    pafs.copy_files(str(root), photos, destination_filesystem=fs)
    out = f"{bucket}/predictions/flowers.parquet"
    done = run_vitflow("predict", "models:/vit-flowers@champion", f"{bucket}/photos", out,
                       "--tracking-uri", registered["uri"], "--workdir", tmp_path, "--top-k", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}: 10 rows, 4 bad image(s)" in done.stdout, done.stdout
    rows = {row["source"]: row for row in pq.read_table(out.removeprefix("s3://"), filesystem=fs).to_pylist()}
    for name, prediction in expected.items():
        check_row(rows[name], prediction, k=2)
    assert "images/s" in done.stdout
    # a bucket that does not exist: refused, naming it, before any work
    done = run_vitflow("predict", "models:/vit-flowers@champion", f"{bucket}/photos", "s3://no-such-bucket-7/p.parquet",
                       "--tracking-uri", registered["uri"], "--workdir", tmp_path, cwd=tmp_path)
    assert done.returncode != 0 and "no-such-bucket-7" in done.stderr, done.stderr[-2000:]


def test_a_folder_gives_one_row_per_file_and_a_reason_for_each_bad_one(registered, photo_folder, local_ray, tmp_path):
    root, expected = photo_folder
    out = tmp_path / "predictions.parquet"
    result = run_predict(config(registered, root, out))
    rows = {row["source"]: row for row in pq.read_table(out).to_pylist()}
    assert set(rows) == set(expected) | {"garden/cut.jpg", "notes.jpg", "README.txt", "empty.png"}
    assert (result.images, result.bad) == (10, 4)
    for name, prediction in expected.items():
        check_row(rows[name], prediction)
    for name in ("garden/cut.jpg", "notes.jpg", "empty.png"):
        assert rows[name]["label"] is None and rows[name]["top_labels"] is None
    assert "truncated" in rows["garden/cut.jpg"]["error"].lower(), rows["garden/cut.jpg"]
    assert "undecodable" in rows["notes.jpg"]["error"] and "starts with b'not an i'" in rows["notes.jpg"]["error"]
    assert "README.txt" in rows and "not an image type" in rows["README.txt"]["error"]
    assert {row["model_uri"] for row in rows.values()} == {f"models:/vit-flowers/{registered['version']}"}

    # The run is on record under the model's own run: what, with which version, how many, how fast.
    client = MlflowClient(registered["uri"], registry_uri=registered["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == f"models:/vit-flowers/{registered['version']}"
    assert run.data.params["source_kind"] == "folder" and run.data.params["out"] == str(out)
    assert run.data.metrics["images"] == 10 and run.data.metrics["bad_images"] == 4
    assert run.data.metrics["images_per_s"] > 0
    stats = client.download_artifacts(result.run_id, "predict/ray_data_stats.txt", str(tmp_path))
    assert "MapBatches(ReadAndClassify)" in open(stats).read()  # on CPUs the actors read their own images
    source_run = client.get_model_version("vit-flowers", registered["version"]).run_id
    assert run.data.tags["mlflow.parentRunId"] == source_run

    # The arrangement the plan picks with GPUs, here on CPUs: reading tasks beside the actors. The same rows.
    plain = tracking.load_plain_model(registered["uri"], result.model_uri)
    split = predict.predict(predict.list_inputs(str(root)), plain, result.model_uri, str(tmp_path / "split.parquet"),
                            batch_size=4, actors=1, cpus_per_actor=0.5, threads=1, readers=1, read_in_actors=False)
    assert (split.images, split.bad) == (10, 4)
    assert "MapBatches(read_and_prepare)" in split.ray_data_stats and "MapBatches(Classify)" in split.ray_data_stats
    fused, apart = pq.read_table(out).to_pylist(), pq.read_table(tmp_path / "split.parquet").to_pylist()
    assert [(r["source"], r["label"], r["error"]) for r in apart] == [(r["source"], r["label"], r["error"]) for r in fused]
    for row, other in zip(apart, fused):
        assert row["score"] == pytest.approx(other["score"], abs=1e-5)


def test_a_table_of_image_bytes_and_a_shard_set(registered, local_ray, tmp_path, flowers_shards):
    photos = registered["photos"]
    table = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"image": pa.array([*photos, b"\x89PNG\r\n\x1a\n broken"], pa.binary()),
                             "label": [0] * (len(photos) + 1)}), table)
    out = tmp_path / "from-table.parquet"
    result = run_predict(config(registered, table, out, top_k=3, batch_size=4))
    rows = pq.read_table(out).to_pylist()
    assert (result.images, result.bad, result.batch_size) == (len(photos) + 1, 1, 4)
    good = [row for row in rows if row["error"] is None]
    assert len(good) == len(photos)
    for row, expected in zip(good, registered["expected"]):  # in the table's order
        check_row(row, expected, k=3)
    assert "undecodable" in [row for row in rows if row["error"]][0]["error"]

    out = tmp_path / "from-shards.parquet"
    result = run_predict(config(registered, flowers_shards, out, actors=1))
    info = json.loads((flowers_shards / "dataset.json").read_text())
    total = sum(split["num_samples"] for split in info["splits"].values())
    rows = pq.read_table(out).to_pylist()
    assert result.images == len(rows) == total and result.bad == 0
    assert len({row["source"] for row in rows}) == total and all("#" in row["source"] for row in rows)
    assert all(row["label"] in registered["classes"] for row in rows)


def test_what_cannot_be_predicted_or_written_is_refused_before_any_work(registered, photo_folder, local_ray, tmp_path):
    root, _ = photo_folder
    with pytest.raises(ValueError, match="out must name a .parquet file"):
        config(registered, root, tmp_path / "predictions.csv")
    (tmp_path / "taken.parquet").mkdir()
    with pytest.raises(StorageError, match="taken.parquet: is a folder"):
        run_predict(config(registered, root, tmp_path / "taken.parquet"))
    with pytest.raises(ValueError, match="no image files"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "notes.txt").write_text("nothing here")
        run_predict(config(registered, empty, tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="nowhere: not found"):
        run_predict(config(registered, tmp_path / "nowhere", tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="vit-nothing"):
        run_predict(config(registered, root, tmp_path / "p.parquet").model_copy(update={"model": "models:/vit-nothing@champion"}))
    assert not (tmp_path / "p.parquet").exists()


def test_on_cpus_the_plan_gives_each_cpu_an_actor_that_reads_its_own_images(registered, local_ray):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    config = tracking.load_plain_model(registered["uri"], "models:/vit-flowers@champion").config
    plan = predict.plan(config, batch_size=None, actors=None)
    assert (plan.actors, plan.threads, plan.cpus_per_actor, plan.gpus_per_actor) == (cpus, 1, 1.0, 0.0)
    assert plan.read_in_actors and 1 <= plan.batch_size <= predict.CPU_BATCH_LIMIT
    one = predict.plan(config, batch_size=8, actors=1)  # one copy: every CPU its thread
    assert (one.actors, one.threads, one.cpus_per_actor, one.batch_size) == (1, cpus, cpus, 8)
