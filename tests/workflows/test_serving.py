"""Using a registered model: `mlflow models serve` on the pyfunc every model is logged with, and `vitflow serve`
on Ray Serve, each answering real HTTP requests with real Flowers-17 photos."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.cli import run_vitflow
from tests.objectstore import free_port
from tests.workflows.servers import MlflowServer

STARTUP_S = 240  # a loaded 2-core machine: Ray, Serve's controller and proxy, a replica importing torch


def check_answer(answer: dict, expected, k: int) -> None:
    """``answer`` (another process's, in bf16 where the CPU has it) is ``expected``'s: the same top-1, k
    labels whose scores are their probabilities, the k most probable (to bf16's rounding: near-ties may swap)."""
    probability = dict(zip(expected.top_labels, expected.top_scores))
    assert answer["label"] == expected.label and answer["top_labels"][0] == expected.label
    assert len(answer["top_labels"]) == len(answer["top_scores"]) == k == len(set(answer["top_labels"]))
    assert answer["score"] == answer["top_scores"][0] == pytest.approx(expected.score, abs=3e-3)
    for label, score in zip(answer["top_labels"], answer["top_scores"]):
        assert score == pytest.approx(probability[label], abs=3e-3), label
    assert answer["top_scores"] == sorted(answer["top_scores"], reverse=True)
    assert min(answer["top_scores"]) >= expected.top_scores[k - 1] - 3e-3


def test_mlflow_models_serve_answers_base64_images(registered, tmp_path):
    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", "models:/vit-flowers@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    # the server execs `uvicorn` by name: this Python's scripts first on PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with MlflowServer(command, port, tmp_path / "serve.log", env=env, health="/ping") as server:
        rows = [[base64.b64encode(photo).decode()] for photo in registered["photos"]]
        answer = requests.post(f"{server.url}/invocations", timeout=60,
                               json={"dataframe_split": {"columns": ["image"], "data": rows}, "params": {"top_k": 3}})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == len(rows)
        for prediction, expected in zip(predictions, registered["expected"]):
            check_answer(prediction, expected, k=3)
        # without params: the logged default, 5
        answer = requests.post(f"{server.url}/invocations", timeout=60,
                               json={"dataframe_split": {"columns": ["image"], "data": rows[:1]}})
        assert len(answer.json()["predictions"][0]["top_labels"]) == 5
        # a bad row fails the request, naming the row and why
        bad = [rows[0], ["bm90IGFuIGltYWdl"], ["%%%"]]  # base64 of "not an image", then no base64 at all
        answer = requests.post(f"{server.url}/invocations", timeout=60,
                               json={"dataframe_split": {"columns": ["image"], "data": bad}})
        assert answer.status_code == 400, answer.text
        message = answer.json()["message"]
        assert "2 of 3 rows are not images" in message and "row 1" in message and "row 2: not base64" in message
        answer = requests.post(f"{server.url}/invocations", timeout=60,
                               json={"dataframe_split": {"columns": ["picture"], "data": rows[:1]}})
        assert answer.status_code == 400 and "image" in answer.json()["message"], answer.text


def test_vitflow_serve_on_ray_serve_batches_real_requests(registered, tmp_path):
    port = free_port()
    vitflow = str(Path(sys.executable).parent / "vitflow")
    log = tmp_path / "serve.log"
    command = [vitflow, "serve", "models:/vit-flowers@champion", "--tracking-uri", registered["uri"],
               "--port", str(port), "--max-batch-size", "4", "--batch-wait-ms", "300", "--route", "/flowers",
               "--workdir", str(tmp_path)]
    url = f"http://127.0.0.1:{port}/flowers"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert process.poll() is None, log.read_text()
            try:
                about = requests.get(url, timeout=10)
                if about.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"no answer in {STARTUP_S} s:\n{log.read_text()}"
            time.sleep(1)
        about = about.json()
        # the alias was pinned to its version before deploying
        assert about["model_uri"] == f"models:/vit-flowers/{registered['version']}"
        assert about["classes"] == registered["classes"] and about["image_size"] == 32
        assert about["options"]["max_batch_size"] == 4 and about["served"] == {"images": 0, "batches": 0}

        # eight images at once: answered in batches of up to 4, each answer its own image's
        photos = registered["photos"] + registered["photos"][:2]
        expected = registered["expected"] + registered["expected"][:2]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda photo: requests.post(url, data=photo, timeout=120,
                                                                headers={"Content-Type": "image/jpeg"}), photos))
        for answer, want in zip(answers, expected):
            assert answer.status_code == 200, answer.text
            check_answer(answer.json(), want, k=5)
        served = requests.get(url, timeout=10).json()["served"]
        assert served["images"] == 8 and 2 <= served["batches"] < 8, served

        answer = requests.post(f"{url}?top_k=2", data=photos[0], timeout=60)
        check_answer(answer.json(), expected[0], k=2)
        answer = requests.post(url, data=b"GIF89a but not an image", timeout=60)
        assert answer.status_code == 400 and "undecodable" in answer.json()["error"], answer.text
        answer = requests.post(f"{url}?top_k=two", data=photos[0], timeout=60)
        assert answer.status_code == 400 and "top_k must be a positive integer" in answer.json()["error"]
        answer = requests.post(url, data=b"", timeout=60)
        assert answer.status_code == 400 and "no body" in answer.json()["error"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 0, log.read_text()
    assert "stopped" in log.read_text()


def test_vitflow_serve_refuses_what_it_cannot_serve(registered, tmp_path):
    uri = registered["uri"]
    result = run_vitflow("serve", "models:/vit-flowers@nobody", "--tracking-uri", uri)
    assert result.returncode == 2 and "vit-flowers@nobody" in result.stderr and "Traceback" not in result.stderr
    result = run_vitflow("serve", str(tmp_path / "no-such-model"), "--tracking-uri", uri)
    assert result.returncode == 2 and "no such folder" in result.stderr, result.stderr
    result = run_vitflow("serve", "models:/vit-flowers/1", "--tracking-uri", uri, "--precision", "fp64")
    assert result.returncode == 2 and "precision must be one of" in result.stderr
    result = run_vitflow("serve", "models:/vit-flowers/1", "--tracking-uri", uri, "--route", "flowers")
    assert result.returncode == 2 and "route_prefix must start with '/'" in result.stderr
