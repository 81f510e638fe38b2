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

    port = free_port()
    with MlflowServer(vitflow_ui(store, port), port, tmp_path / "ui-server.log") as server:
        runs_page = f"{server.url}/#/experiments/{experiment_id}/runs"
        runs_text = browser.visible_text(browser.dump_dom(runs_page))
        assert "mini" in runs_text, runs_text[:3000]
        # the workflow's parent run and its stage runs (nested under it in the runs table)
        parent_page = f"{server.url}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
        parent_text = browser.visible_text(browser.dump_dom(parent_page))
        assert "mini" in parent_text and "spec.yaml" in parent_text or "Child runs" in parent_text, parent_text[:3000]
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) >= 5
        # The table nests stage runs under the workflow's run (collapsed); a stage run's own page names it
        # and links its parent run.
        (pretrain_run,) = [run for run in children if run.data.tags.get("vitflow.stage") == "pretrain"]
        child_page = f"{server.url}/#/experiments/{experiment_id}/runs/{pretrain_run.info.run_id}"
        child_text = browser.text_showing(child_page, pretrain_run.info.run_name, "perf/mfu", "perf/data_wait_fraction")
        assert pretrain_run.info.run_name in child_text and "Parent run" in child_text, child_text[:3000]
        # its speed (perf/*) and its machine (MLflow's system metrics, on their own tab)
        assert "perf/mfu" in child_text and "perf/data_wait_fraction" in child_text, child_text[:3000]
        system_text = browser.text_showing(f"{child_page}/system-metrics", "cpu_utilization_percentage")
        assert "cpu_utilization_percentage" in system_text, system_text[:3000]

        for name in ("vit-pretrained", "vit-finetuned"):
            model_text = browser.visible_text(browser.dump_dom(f"{server.url}/#/models/{name}"))
            assert "Version 1" in model_text, model_text[:3000]
        finetuned_text = browser.visible_text(browser.dump_dom(f"{server.url}/#/models/vit-finetuned"))
        assert "champion" in finetuned_text, finetuned_text[:3000]
        assert str(MlflowClient(client.tracking_uri, registry_uri=client.tracking_uri).get_model_version_by_alias(
            "vit-finetuned", "champion").version) == "1"

        shots = tmp_path / "screenshots"
        # The models' pages, not the list: on a first visit the list hides behind a dialog about the new registry UI.
        for name, url in (("runs", runs_page), ("parent", parent_page), ("pretrain", child_page),
                          ("pretrain-system", f"{child_page}/system-metrics"),
                          ("finetuned", f"{server.url}/#/models/vit-finetuned")):
            png = browser.screenshot(url, shots / f"{name}.png")
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000  # not a blank page
    print(f"screenshots: {shots}")
