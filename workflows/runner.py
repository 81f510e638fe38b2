"""Runs a workflow spec: stages in dependency order on Ray, cached by fingerprint, resumable, tracked.

    preprocess:<corpus> (parallel Ray tasks) -> pretrain (Ray Train) -> finetune (Ray Tune) -> evaluate

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

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workflows import tags as tag
from workflows import tracking
from workflows.local_ray import TRIAL_DRIVER_RESOURCE, embedded_ray
from workflows.preprocess import log_preprocess, preprocess_task
from workflows.spec import WorkflowSpec


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    """What a stage hands the next ones: small, typed, JSON-able."""

    stage: str  # "preprocess:cifar10", "pretrain", "finetune", "evaluate"
    run_id: str
    fingerprint: str
    reused: bool = False
    dataset_uri: str | None = None
    dataset_fingerprint: str | None = None
    model_uri: str | None = None  # models:/NAME/VERSION when registered
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("reused")
        return json.dumps(data, sort_keys=True)


def code_version() -> str:
    """vitflow's version plus the git commit of the checkout it runs from (when it is one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("vitflow")
    except PackageNotFoundError:
        package = "unknown"
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        return f"{package}+g{commit}"
    except (OSError, subprocess.SubprocessError):
        return package


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def corpus_fingerprint(source: str) -> str:
    """A cheap identity of a local corpus: every file's relative path, size and modification time."""
    path = Path(source)
    if "://" in source or not path.exists():
        return fingerprint(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class WorkflowRunner:
    def __init__(self, spec: WorkflowSpec, *, force: set[str] | None = None, from_stage: str | None = None,
                 on_event: Callable[[str, str, str], None] | None = None):
        self.spec = spec
        self.workdir = Path(spec.workdir)
        self.stages = self._stage_names()
        unknown = sorted((force or set()) - set(self.stages) - {"preprocess"})
        if unknown or (from_stage and from_stage not in self.stages and from_stage != "preprocess"):
            raise ValueError(f"unknown stage {', '.join(unknown) or from_stage}; this workflow has: {', '.join(self.stages)}")
        self.force = set(force or ())
        if "preprocess" in self.force:
            self.force |= {s for s in self.stages if s.startswith("preprocess:")}
        if from_stage:
            start = next(i for i, s in enumerate(self.stages) if s == from_stage or s.startswith(f"{from_stage}:"))
            self.force |= set(self.stages[start:])
        self.on_event = on_event or (lambda stage, status, detail: None)
        self.search_callbacks: list[Any] = []  # Tune callbacks for the search (e.g. a console's view of it)
        # On a cluster (cluster.yaml) the environment names the shared tracking server and storage.
        self.tracking_uri = (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or tracking.default_tracking_uri(self.workdir))
        self.storage_path = spec.storage_path or os.environ.get("VITFLOW_STORAGE") or str(self.workdir / "runs")
        self.code = code_version()
        self.results: dict[str, StageResult] = {}

    def _stage_names(self) -> list[str]:
        names = [f"preprocess:{name}" for name in self.spec.preprocess]
        return names + [stage.name for stage in TRAINING_STAGES if self._section(stage) is not None]

    def _section(self, stage: TrainingStage):
        return getattr(self.spec, stage.name)  # the spec's typed section of that name (pydantic field)

    # --- the whole run ---------------------------------------------------------------------------

    def preflight(self, ray_address: str | None = None) -> None:
        """Seconds of checks before any work: corpora exist, the tracking server (and ``ray_address``)
        answer, the models the spec names are registered. Raises ``PreflightError`` or
        ``TrackingUnavailable`` naming the key."""
        from workflows.preflight import check_workflow

        check_workflow(self.spec, self.tracking_uri, ray_address)

    def run(self, spec_text: str = "") -> dict[str, StageResult]:
        import ray

        address = self.spec.ray.address or os.environ.get("RAY_ADDRESS")  # RAY_ADDRESS: a Ray Jobs driver
        self.preflight(ray_address=None if ray.is_initialized() else address)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The workflow's own Ray (and driver lock) unless it names a cluster: a rerun after a killed driver
        # first stops what that driver's Ray left behind.
        concurrency = self.spec.finetune.search.max_concurrent_trials if self.spec.finetune else 1
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
            for stage in TRAINING_STAGES:
                if self._section(stage) is not None:
                    self._run_stage(stage)
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

    # --- caching ---------------------------------------------------------------------------------

    def _cached(self, stage: str, stage_fingerprint: str) -> StageResult | None:
        if stage in self.force:
            return None
        for run in tracking.runs_with_tags(self.tracking_uri, self.spec.tracking.experiment,
                                           {tag.STAGE_FINGERPRINT: stage_fingerprint}, status="FINISHED"):
            stored = run.data.tags.get(tag.RESULT)
            if not stored:
                continue
            result = StageResult(**json.loads(stored), reused=True)
            if self._still_valid(result):
                return result
        return None

    def _still_valid(self, result: StageResult) -> bool:
        if result.dataset_uri and not result.model_uri:
            from pipeline import verify_shards

            try:
                return verify_shards(result.dataset_uri).ok
            except (OSError, ValueError):
                return False
        if result.model_uri:
            return tracking.model_exists(self.tracking_uri, result.model_uri)
        return True

    def _finish(self, stage: str, stage_fingerprint: str, result: StageResult) -> StageResult:
        tracking.set_tags(self.tracking_uri, result.run_id, {tag.STAGE_FINGERPRINT: stage_fingerprint, tag.RESULT: result.to_json(),
                                                             tag.STAGE_NAME: stage, tag.CODE_VERSION: self.code})
        self.results[stage] = result
        self.on_event(stage, "finished", self.run_link(result.run_id))
        return result

    def _name(self, stage: str, stage_fingerprint: str) -> str:
        """Deterministic per fingerprint (so a rerun resumes); a forced rerun gets the next free suffix."""
        name = f"{self.spec.name}-{stage}-{stage_fingerprint[:10]}"
        if stage in self.force:
            taken = tracking.runs_with_tags(self.tracking_uri, self.spec.tracking.experiment, {tag.STAGE_FINGERPRINT: stage_fingerprint})
            name += f"-r{len(taken)}" if taken else ""
        return name

    # --- stages ----------------------------------------------------------------------------------

    def _preprocess_all(self) -> None:
        import ray

        pending = {}
        for name, stage in self.spec.preprocess.items():
            key = f"preprocess:{name}"
            out = stage.out or str(self.workdir / "data" / name)
            stage_fp = fingerprint(key, stage.source, stage.config.model_dump(mode="json"), out,
                                   corpus_fingerprint(stage.source), self.code)
            cached = self._cached(key, stage_fp)
            if cached is not None:
                self.results[key] = cached
                self.on_event(key, "reused", self.run_link(cached.run_id))
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

    def _run_stage(self, stage: TrainingStage) -> StageResult:
        section = self._section(stage)
        dataset = self.results[f"preprocess:{section.dataset}"]
        inputs: list[Any] = [dataset.dataset_fingerprint]
        if stage.model_key:  # the model it starts from: named in its section, or the upstream stage's
            inputs.append(getattr(section, stage.model_key) or self.results[stage.model_from].model_uri)
        stage_fp = fingerprint(stage.name, section.model_dump(mode="json"), inputs, self.code)
        cached = self._cached(stage.name, stage_fp)
        if cached is not None:
            self.results[stage.name] = cached
            self.on_event(stage.name, "reused", self.run_link(cached.run_id))
            return cached
        self.on_event(stage.name, "running", "")
        name = self._name(stage.name, stage_fp)
        common = {"tracking": {**self.spec.tracking.model_dump(), "uri": self.tracking_uri}}
        fields = section.model_dump(exclude={"dataset", *([stage.model_key] if stage.model_key else [])})
        try:
            result = stage.run(self, name, fields, dataset, common, inputs, stage_fp)
        except Exception:
            self.on_event(stage.name, "failed", "")
            raise
        return self._finish(stage.name, stage_fp, result)

    def _pretrain(self, name, fields, dataset, common, inputs, stage_fp) -> StageResult:
        from workflows.pretrain import PretrainConfig, run_pretrain

        config = PretrainConfig.model_validate({**fields, **common, "name": name, "dataset": dataset.dataset_uri,
                                                "storage_path": self.storage_path})
        result = run_pretrain(config, parent_run_id=self.parent)
        if result.offline:
            from workflows.tracking import TrackingUnavailable

            raise TrackingUnavailable(f"pre-training finished but MLflow at {self.tracking_uri} is unreachable: "
                                      f"upload its model with `vitflow upload {result.offline}`, then run the workflow again")
        model_uri = f"models:/{result.registered_name}/{result.version}" if result.version else result.model_uri
        return StageResult(stage="pretrain", run_id=result.run_id, fingerprint=stage_fp, model_uri=model_uri,
                           dataset_fingerprint=dataset.dataset_fingerprint, metrics=_numbers(result.metrics))

    def _finetune(self, name, fields, dataset, common, inputs, stage_fp) -> StageResult:
        from workflows.finetune import FinetuneSearchConfig, run_finetune

        config = FinetuneSearchConfig.model_validate({**fields, **common, "name": name, "dataset": dataset.dataset_uri,
                                                      "pretrained": inputs[1], "storage_path": self.storage_path})
        result = run_finetune(config, parent_run_id=self.parent, callbacks=self.search_callbacks)
        model_uri = f"models:/{result.registered_name}/{result.version}" if result.version else result.model_uri
        return StageResult(stage="finetune", run_id=result.search_run_id, fingerprint=stage_fp, model_uri=model_uri,
                           dataset_fingerprint=dataset.dataset_fingerprint, metrics={"test/top1": result.test_top1})

    def _evaluate(self, name, fields, dataset, common, inputs, stage_fp) -> StageResult:
        from workflows.evaluate import EvaluateConfig, run_evaluate

        config = EvaluateConfig(model=inputs[1], dataset=dataset.dataset_uri, split=fields["split"],
                                batch_size=fields["batch_size"], **common)
        result = run_evaluate(config, parent_run_id=self.parent)
        return StageResult(stage="evaluate", run_id=result.run_id, fingerprint=stage_fp,
                           dataset_fingerprint=dataset.dataset_fingerprint,
                           metrics={f"{config.split}/top1": result.top1, f"{config.split}/top5": result.top5})


@dataclass(frozen=True)
class TrainingStage:
    """A stage after preprocessing, as the runner sees it: the spec section of its name, the model it starts
    from (its section's ``model_key``, else the result of stage ``model_from``) and its adapter, which turns
    the section into the stage's own typed config, runs it, and returns a ``StageResult``."""

    name: str
    run: Callable[..., StageResult]
    model_key: str | None = None
    model_from: str | None = None


# In order: each may take the one before's model. A new stage is a row here and an adapter above.
TRAINING_STAGES = (
    TrainingStage("pretrain", WorkflowRunner._pretrain),
    TrainingStage("finetune", WorkflowRunner._finetune, model_key="pretrained", model_from="pretrain"),
    TrainingStage("evaluate", WorkflowRunner._evaluate, model_key="model", model_from="finetune"),
)


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
