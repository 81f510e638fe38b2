"""The MLflow UI in a real browser: a real pre-training into an embedded store, `vitflow ui` on it, and
headless Chromium (driven by Playwright) reading the rendered pages. The UI is a single-page app: the
texts exist only after its scripts ran and its requests came back, so each page is read once it shows
what is asserted (see tests/workflows/browser.py), and a page that never shows it fails with its text."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.workflows import browser
from tests.workflows.servers import MlflowServer, free_port


def vitflow_ui(store: Path, port: int) -> list[str]:
    exe = shutil.which("vitflow") or str(Path(sys.executable).parent / "vitflow")
    return [exe, "ui", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}", "--port", str(port)]


@pytest.mark.slow
def test_the_ui_shows_the_workflow_its_stage_runs_and_both_models(tmp_path, mini_workflow):
    assert browser.chromium() is not None, "Debian's chromium is missing (apt-get install chromium; .ci/run does)"
    store = mini_workflow.workdir
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("mini").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`vitflow.workflow` = 'mini'")

    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) >= 5
    (pretrain_run,) = [run for run in children if run.data.tags.get("vitflow.stage") == "pretrain"]

    port = free_port()
    shots = tmp_path / "screenshots"
    with MlflowServer(vitflow_ui(store, port), port, tmp_path / "ui-server.log") as server, browser.launched() as chromium:
        # the experiment's runs table lists the workflow's run (its stage runs nest under it, collapsed)
        runs_page = f"{server.url}/#/experiments/{experiment_id}/runs"
        runs_text = browser.text_showing(chromium, runs_page, parent.info.run_name, screenshot=shots / "runs.png")
        assert parent.info.run_name in runs_text, runs_text[:3000]
        # the workflow's run lists its stage runs as child runs
        parent_page = f"{server.url}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
        stage_names = [run.info.run_name for run in children]
        parent_text = browser.text_showing(chromium, parent_page, "Child runs", *stage_names,
                                          screenshot=shots / "parent.png")
        assert "Child runs" in parent_text and all(name in parent_text for name in stage_names), parent_text[:3000]
        # a stage run's own page names it, links its parent run, and shows its speed (perf/*)
        child_page = f"{server.url}/#/experiments/{experiment_id}/runs/{pretrain_run.info.run_id}"
        shown = (pretrain_run.info.run_name, "Parent run", "perf/mfu", "perf/data_wait_fraction")
        child_text = browser.text_showing(chromium, child_page, *shown, screenshot=shots / "pretrain.png")
        assert all(item in child_text for item in shown), child_text[:3000]
        # and its machine: MLflow's system metrics, charted on their own tab
        system_page = f"{child_page}/system-metrics"
        charts = ("cpu_utilization_percentage", "system_memory_usage_megabytes")
        system_text = browser.text_showing(chromium, system_page, *charts, screenshot=shots / "pretrain-system.png")
        assert all(chart in system_text for chart in charts), system_text[:3000]

        # each registered model's page (not the list: on a first visit it hides behind a dialog about the new
        # registry UI) shows its version; the fine-tuned one's carries the champion alias
        pretrained_text = browser.text_showing(chromium, f"{server.url}/#/models/vit-pretrained", "Version 1")
        assert "Version 1" in pretrained_text, pretrained_text[:3000]
        finetuned_text = browser.text_showing(chromium, f"{server.url}/#/models/vit-finetuned", "Version 1", "champion",
                                             screenshot=shots / "finetuned.png")
        assert "Version 1" in finetuned_text and "champion" in finetuned_text, finetuned_text[:3000]
        assert str(MlflowClient(client.tracking_uri, registry_uri=client.tracking_uri).get_model_version_by_alias(
            "vit-finetuned", "champion").version) == "1"

    for name in ("runs", "parent", "pretrain", "pretrain-system", "finetuned"):
        png = shots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000  # not a blank page
    print(f"screenshots: {shots}")
