"""Runs a workflow spec: stages in dependency order on Ray, cached by fingerprint, resumable, tracked.

    preprocess:<corpus> (parallel Ray tasks) -> pretrain (Ray Train) -> finetune (Ray Tune) -> evaluate
        -> predict:<name> (Ray Data)        with finetune.tasks: finetune:<task> and evaluate:<task> per task,
                                            the tasks' searches at the same time (workflows.compute.searches)

- Every execution is one MLflow parent run; each stage is a nested run tagged with its fingerprint.
- A stage's fingerprint hashes its configuration, its inputs' fingerprints (corpus listing, dataset
  fingerprint, model version) and the code version. A finished stage run with the same fingerprint and a
  still-valid output (shards that verify, a registered model version that exists) is reused, and the
  terminal and the parent run say so. ``force`` reruns named stages; ``from_stage`` reruns it and all after.
- Resume: stage runs have deterministic names derived from their fingerprints, so running a killed
  workflow again reuses its finished stages, resumes pre-training from its last checkpoint (Ray Train
  snapshot) and the search from its Tune state, and registers no model twice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows import tags as tag
from workflows import tracking
from workflows.cache import StageCache, code_version, corpus_fingerprint, fingerprint
from workflows.compute.local_ray import TRIAL_DRIVER_RESOURCE, embedded_ray
from workflows.results import StageInputs, StageResult
from workflows.spec import WorkflowSpec
from workflows.stages import evaluate, finetune, pretrain
from workflows.stages.preprocess import log_preprocess, preprocess_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingStage:
    """A stage after preprocessing, as the runner sees it: its name (``pretrain``, ``finetune`` or
    ``finetune:TASK``, ``evaluate`` or ``evaluate:TASK``), its kind's ``run`` (which takes the spec section
    and the :class:`StageInputs` and returns a :class:`StageResult`), its section, the preprocess stage it
    reads, and the model it starts from: ``model`` (given in its section) or the result of ``model_from``."""

    name: str
    run: Callable[[Any, StageInputs], StageResult]
    section: Any
    dataset: str
    model: str | None = None
    model_from: str | None = None
    takes_model: bool = False
    search: bool = False  # a Ray Tune search: the runner's search callbacks watch it


def training_stages(spec: WorkflowSpec) -> list[TrainingStage]:
    """The spec's stages after preprocessing, in order: each may take a model from one before it."""
    stages = []
    if spec.pretrain is not None:
        stages.append(TrainingStage("pretrain", pretrain.run_stage, spec.pretrain, spec.pretrain.dataset))
    finetunes = spec.finetune_stages()
    for name, section in finetunes.items():
        stages.append(TrainingStage(name, finetune.run_stage, section, section.dataset, model=section.pretrained,
                                    model_from=None if section.pretrained else "pretrain", takes_model=True,
                                    search=True))
    if spec.evaluate is not None:
        if finetunes and spec.evaluate.model is None:  # each fine-tuned model on its own task's dataset
            for name, section in finetunes.items():
                stages.append(TrainingStage(name.replace("finetune", "evaluate", 1), evaluate.run_stage, spec.evaluate,
                                            spec.evaluate.dataset or section.dataset, model_from=name, takes_model=True))
        else:
            stages.append(TrainingStage("evaluate", evaluate.run_stage, spec.evaluate, spec.evaluate.dataset,
                                        model=spec.evaluate.model, model_from="finetune", takes_model=True))
    return stages


class WorkflowRunner:
    def __init__(self, spec: WorkflowSpec, *, force: set[str] | None = None, from_stage: str | None = None,
                 on_event: Callable[[str, str, str], None] | None = None):
        self.spec = spec
        self.workdir = Path(spec.workdir)
        self.stages = self._stage_names()
        groups = {s.split(":")[0] for s in self.stages}
        unknown = sorted((force or set()) - set(self.stages) - groups)
        if unknown or (from_stage and from_stage not in self.stages and from_stage not in groups):
            raise ValueError(f"unknown stage {', '.join(unknown) or from_stage}; this workflow has: {', '.join(self.stages)}")
        self.force = set(force or ())
        for group in ("preprocess", "finetune", "evaluate", "predict"):  # a group's name forces each of its stages
            if group in self.force:
                self.force |= {s for s in self.stages if s.startswith(f"{group}:")}
        if from_stage:
            start = next(i for i, s in enumerate(self.stages) if s == from_stage or s.startswith(f"{from_stage}:"))
            self.force |= set(self.stages[start:])
        self.on_event = on_event or (lambda stage, status, detail: None)
        # Tune callbacks for a search (e.g. a console's view of it), given the stage's name and section
        self.search_callbacks: Callable[[str, Any], Sequence[Any]] = lambda stage, section: ()
        # On a cluster (cluster.yaml) the environment names the shared tracking server and storage.
        self.tracking_uri = (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or tracking.default_tracking_uri(self.workdir))
        self.storage_path = spec.storage_path or os.environ.get("VITFLOW_STORAGE") or str(self.workdir / "runs")
        self.code = code_version()
        self.cache = StageCache(self.tracking_uri, spec.tracking.experiment, force=self.force, code=self.code)
        self.results: dict[str, StageResult] = {}

    def _stage_names(self) -> list[str]:
        return ([f"preprocess:{name}" for name in self.spec.preprocess] + [s.name for s in training_stages(self.spec)]
                + [f"predict:{name}" for name in self.spec.predict])

    # --- the whole run ---------------------------------------------------------------------------

    def preflight(self, ray_address: str | None = None) -> None:
        """Seconds of checks before any work: corpora exist, the tracking server (and ``ray_address``)
        answer, the models the spec names are registered. Raises ``PreflightError`` or
        ``TrackingUnavailable`` naming the key."""
        from workflows.stages.preflight import check_workflow

        check_workflow(self.spec, self.tracking_uri, ray_address, self.storage_path)

    def run(self, spec_text: str = "") -> dict[str, StageResult]:
        import ray

        address = self.spec.ray.address or os.environ.get("RAY_ADDRESS")  # RAY_ADDRESS: a Ray Jobs driver
        self.preflight(ray_address=None if ray.is_initialized() else address)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Slots for the trial drivers of multi-worker trials: the downstream tasks' searches run at once.
        concurrency = max(sum(s.search.max_concurrent_trials for s in self.spec.finetune_stages().values()), 1)
        # The workflow's own Ray (and driver lock) unless it names a cluster: a rerun after a killed driver
        # first stops what that driver's Ray left behind.
        with embedded_ray(self.workdir, address=address, num_cpus=self.spec.ray.num_cpus,
                          resources={TRIAL_DRIVER_RESOURCE: concurrency}):
            return self._run_tracked(spec_text)

    def _run_tracked(self, spec_text: str) -> dict[str, StageResult]:
        experiment = self.spec.tracking.experiment
        tracking.ensure_experiment(experiment, self.tracking_uri)
        here = {tag.WORKFLOW: self.spec.name, tag.WORKDIR: str(self.workdir.resolve())}
        # Executions of this workflow still RUNNING belong to a driver that died (this one holds the
        # working directory's lock): close them, and link this execution to the one it continues.
        dead = [run.info.run_id for run in tracking.runs_with_tags(self.tracking_uri, experiment, here, status="RUNNING")]
        for run_id in dead:
            tracking.end_run(self.tracking_uri, run_id, status="KILLED")
        self.parent = tracking.start_run(self.tracking_uri, experiment, self.spec.name, tags={
            **here, tag.CODE_VERSION: self.code, **({tag.CONTINUES: dead[0]} if dead else {})})
        if dead:
            self.on_event("workflow", "resuming", f"after a killed driver (execution {dead[0]} marked KILLED)")
        self.on_event("workflow", "running", self.run_link(self.parent))
        tracking.log_text(self.tracking_uri, self.parent, spec_text, "spec.yaml")
        tracking.log_text(self.tracking_uri, self.parent, self.spec.model_dump_json(indent=2), "resolved_spec.json")
        tracking.log_params(self.tracking_uri, self.parent, {"workflow": self.spec.name, "code_version": self.code,
                                                             "stages": ",".join(self.stages)})
        status = "FAILED"
        try:
            self._preprocess_all()
            stages = training_stages(self.spec)
            while stages:  # in order; the searches of several downstream tasks at once
                batch = [s for s in stages if s.search] if stages[0].search else stages[:1]
                if len(batch) > 1:
                    self._run_searches(batch)
                else:
                    self._run_stage(batch[0])
                stages = [s for s in stages if s not in batch]
            if len(self.spec.finetune_stages()) > 1:
                self._log_transfer_table()
            for name in self.spec.predict:
                self._run_predict(name)
            status = "FINISHED"
        finally:
            try:
                tracking.set_tags(self.tracking_uri, self.parent, {
                    f"{tag.REUSED_PREFIX}{r.stage}": r.run_id for r in self.results.values() if r.reused})
                tracking.end_run(self.tracking_uri, self.parent, status=status)
            except Exception as error:  # the tracking server went away: say so, keep the stage's own error
                if not tracking.is_unreachable(error, self.tracking_uri):
                    raise
                log.warning("could not close the workflow's MLflow run %s: %s unreachable", self.parent, self.tracking_uri)
            self.on_event("workflow", status.lower(), self.run_link(self.parent))
        return self.results

    def run_link(self, run_id: str) -> str:
        return tracking.run_url(self.tracking_uri, self.spec.tracking.experiment, run_id)

    def _reused(self, stage: str, stage_fp: str) -> bool:
        cached = self.cache.lookup(stage, stage_fp)
        if cached is not None:
            self.results[stage] = cached
            self.on_event(stage, "reused", self.run_link(cached.run_id))
        return cached is not None

    def _finish(self, stage: str, stage_fp: str, result: StageResult) -> StageResult:
        self.cache.record(stage, stage_fp, result)
        self.results[stage] = result
        self.on_event(stage, "finished", self.run_link(result.run_id))
        return result

    # --- stages ----------------------------------------------------------------------------------

    def _preprocess_all(self) -> None:
        import ray

        pending = {}
        for name, stage in self.spec.preprocess.items():
            key = f"preprocess:{name}"
            out = stage.out or str(self.workdir / "data" / name)
            stage_fp = fingerprint(key, stage.source, stage.config.model_dump(mode="json"), out,
                                   corpus_fingerprint(stage.source), self.code)
            if self._reused(key, stage_fp):
                continue
            run_id = self._stage_run(key, stage_fp, {"source": stage.source, "out": out, "config": stage.config.model_dump(mode="json")})
            self.on_event(key, "running", self.run_link(run_id))
            # Independent corpora shard in parallel: each stage is a Ray task fanning out shard tasks.
            task = ray.remote(num_cpus=0)(preprocess_task).remote(stage.source, out, stage.config.model_dump(mode="json"), stage.workers)
            pending[task] = (key, stage_fp, run_id)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key, stage_fp, run_id = pending.pop(done[0])
            try:
                summary = ray.get(done[0])
            except Exception:
                tracking.end_run(self.tracking_uri, run_id, status="FAILED")
                self.on_event(key, "failed", self.run_link(run_id))
                raise
            log_preprocess(self.tracking_uri, run_id, summary)
            self._finish(key, stage_fp, StageResult(stage=key, run_id=run_id, fingerprint=stage_fp,
                                                    dataset_uri=summary["out"], dataset_fingerprint=summary["fingerprint"]))

    def _stage_run(self, stage: str, stage_fp: str, params: dict) -> str:
        run_id = tracking.start_run(self.tracking_uri, self.spec.tracking.experiment, f"{self.spec.name}-{stage}",
                                    parent_run_id=self.parent, tags={tag.STAGE: stage.split(":")[0],
                                                                     tag.STAGE_NAME: stage})
        tracking.log_params(self.tracking_uri, run_id, params)
        return run_id

    def _prepare(self, stage: TrainingStage) -> tuple[str, StageInputs] | None:
        """The stage's fingerprint and inputs; None when a finished run with that fingerprint is reused."""
        section = stage.section
        dataset = self.results[f"preprocess:{stage.dataset}"]
        inputs: list[Any] = [dataset.dataset_fingerprint]
        if stage.takes_model:  # the model it starts from: named in its section, or the upstream stage's
            inputs.append(stage.model or self.results[stage.model_from].model_uri)
        stage_fp = fingerprint(stage.name, section.model_dump(mode="json"), inputs, self.code)
        if self._reused(stage.name, stage_fp):
            return None
        return stage_fp, StageInputs(
            name=self.cache.run_name(self.spec.name, stage.name.replace(":", "-"), stage_fp), fingerprint=stage_fp,
            dataset=dataset, model=inputs[1] if stage.takes_model else None, parent_run_id=self.parent,
            storage_path=self.storage_path, tracking=self.spec.tracking.model_copy(update={"uri": self.tracking_uri}))

    def _run_stage(self, stage: TrainingStage) -> StageResult:
        prepared = self._prepare(stage)
        return self.results[stage.name] if prepared is None else self._run_prepared(stage, *prepared)

    def _run_prepared(self, stage: TrainingStage, stage_fp: str, given: StageInputs) -> StageResult:
        self.on_event(stage.name, "running", "")
        if stage.search:
            given = dataclasses.replace(given, callbacks=tuple(self.search_callbacks(stage.name, stage.section)))
        try:
            result = stage.run(stage.section, given)
        except Exception:
            self.on_event(stage.name, "failed", "")
            raise
        return self._finish(stage.name, stage_fp, dataclasses.replace(result, stage=stage.name))

    def _run_searches(self, stages: list[TrainingStage]) -> None:
        """The searches of several downstream tasks, at the same time on the shared Ray (each in a Ray task
        of its own: see ``workflows.compute.searches``), their trials shown as they come. A failed search
        does not stop the others; their results are kept (cached) before the first failure is raised."""
        from workflows.compute.searches import run_concurrently

        prepared = {stage.name: (stage, *p) for stage in stages if (p := self._prepare(stage)) is not None}
        if len(prepared) < 2:  # the others were reused
            for stage, stage_fp, given in prepared.values():
                self._run_prepared(stage, stage_fp, given)
            return
        for name in prepared:
            self.on_event(name, "running", "")

        def done(name: str, outcome) -> None:
            stage, stage_fp, _ = prepared[name]
            if outcome.error is None:
                self._finish(name, stage_fp, dataclasses.replace(outcome.value, stage=name))
            else:
                self.on_event(name, "failed", f"{type(outcome.error).__name__}: {outcome.error}")

        outcomes = run_concurrently(
            {name: (_search_in_task, (stage.run, stage.section, given)) for name, (stage, _, given) in prepared.items()},
            {name: tuple(self.search_callbacks(name, stage.section)) for name, (stage, _, _) in prepared.items()},
            on_done=done)
        # the results in the spec's order, whichever search ended first
        order = list(self.stages)
        self.results = dict(sorted(self.results.items(), key=lambda item: order.index(item[0])))
        failed = [outcomes[name].error for name in prepared if outcomes[name].error is not None]
        if failed:
            raise failed[0]

    def _run_predict(self, name: str) -> StageResult:
        from workflows.stages import predict

        key, section = f"predict:{name}", self.spec.predict[name]
        given, model_from = self.spec.predict_model(name)
        model_uri = given or self.results[model_from].model_uri
        out = section.out or str(self.workdir / "predictions" / f"{name}.parquet")
        stage_fp = fingerprint(key, section.model_dump(mode="json"), out, model_uri, corpus_fingerprint(section.source),
                               self.code)
        if self._reused(key, stage_fp):
            return self.results[key]
        self.on_event(key, "running", "")
        try:
            result = predict.run_stage(section, name, model_uri, out, self.spec.tracking.model_copy(
                update={"uri": self.tracking_uri}), self.parent, stage_fp)
        except Exception:
            self.on_event(key, "failed", "")
            raise
        return self._finish(key, stage_fp, result)

    def _log_transfer_table(self) -> None:
        """The paper's Table 2 for this workflow: one row per downstream task (its best trial's resolution and
        lr, validation and test top-1, GFLOPs per image, the model), on the workflow's run as a Parquet
        table, a markdown table and a PNG (``transfer/``)."""
        from workflows.stages.finetune import transfer_rows, write_transfer_table

        rows = transfer_rows(self.spec, self.results)
        with tempfile.TemporaryDirectory() as tmp:
            files = write_transfer_table(rows, Path(tmp))
            tracking.log_artifacts(self.tracking_uri, self.parent, files, "transfer")
        tracking.log_metrics(self.tracking_uri, self.parent, {
            f"transfer/{row['task']}/test_top1": row["test_top1"] for row in rows if row["test_top1"] is not None})


def _search_in_task(run: Callable[[Any, StageInputs], StageResult], section: Any, given: StageInputs,
                    relay: Any) -> StageResult:
    """A search stage in its own Ray task, its trial events relayed to the driver's view."""
    return run(section, dataclasses.replace(given, callbacks=(relay,)))
