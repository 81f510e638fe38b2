"""The MLflow UI in a real browser: a real pre-training into an embedded store, `vitflow ui` on it, and
headless Chromium reading the rendered pages (the UI is a single-page app: the texts exist only after
its scripts ran, hence the rendered DOM, not the HTML the server sends)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.workflows import browser
from tests.workflows.servers import MlflowServer, free_port
from workflows.pretrain import PretrainConfig, run_pretrain

pytestmark = pytest.mark.skipif(browser.chromium() is None, reason="no chromium (.ci/run installs Debian's)")


def vitflow_ui(store: Path, port: int) -> list[str]:
    exe = shutil.which("vitflow") or str(Path(sys.executable).parent / "vitflow")
    return [exe, "ui", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--port", str(port)]


@pytest.mark.slow
def test_the_ui_shows_the_experiment_its_runs_and_the_registered_model(tmp_path, cifar_shards, local_ray):
    store = tmp_path / "store"
    settings = PretrainConfig.model_validate({
        "name": "tiny-pretrain",
        "dataset": str(cifar_shards),
        "model": {"variant": "Ti/8", "image_size": 32, "embed_dim": 48, "depth": 2, "num_heads": 3},
        "data": {"batch_size": 32, "num_workers": 1, "shuffle_buffer": 64},
        "train": {"total_steps": 10, "log_every": 5, "checkpoint_every": 10, "optim": {"lr": 2e-3, "warmup_steps": 2}},
        "resources": {"num_workers": 1},
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"uri": f"sqlite:///{store / 'mlflow.db'}", "experiment": "ui-test"},
    })
    result = run_pretrain(settings)
    experiment_id = MlflowClient(settings.tracking.uri).get_experiment_by_name("ui-test").experiment_id

    port = free_port()
    with MlflowServer(vitflow_ui(store, port), port, tmp_path / "ui-server.log") as server:
        runs_page = f"{server.url}/#/experiments/{experiment_id}/runs"
        runs_text = browser.visible_text(browser.dump_dom(runs_page))
        assert "ui-test" in runs_text and "tiny-pretrain" in runs_text, runs_text[:3000]

        models_text = browser.visible_text(browser.dump_dom(f"{server.url}/#/models"))
        assert "vit-pretrained" in models_text, models_text[:3000]
        model_text = browser.visible_text(browser.dump_dom(f"{server.url}/#/models/vit-pretrained"))
        assert f"Version {result.version}" in model_text, model_text[:3000]

        shots = tmp_path / "screenshots"
        # The model's page, not the list: on a first visit the list hides behind a dialog about the new registry UI.
        for name, url in (("runs", runs_page), ("model", f"{server.url}/#/models/vit-pretrained")):
            png = browser.screenshot(url, shots / f"{name}.png")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000  # not a blank page
    print(f"screenshots: {shots}")
