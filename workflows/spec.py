"""The workflow spec: one YAML file describing a whole run, validated before any work starts.

    name: quickstart
    tracking: {uri: null, experiment: quickstart}    # default: SQLite + artifacts under the workdir
    ray: {address: null}                               # default: start a local Ray
    preprocess:                                        # one stage per corpus; they run in parallel
      cifar10: {source: ../../shared/datasets/cifar10}
      flowers17: {source: ../../shared/datasets/flowers17, config: {max_size: 64, val_fraction: 0.1}}
    pretrain: {dataset: cifar10, model: {...}, train: {...}}
    finetune: {dataset: flowers17, mode: full, optim: {...}, train: {...}, search: {...}}  # `pretrained: models:/...`
                                                       # without pretrain; the search sets image_size and lr
    evaluate: {dataset: flowers17, split: test}
    predict: {photos: {source: ../my-photos, out: predictions.parquet}}   # the fine-tuned model, by default

Several downstream tasks (the paper's Table 2: one pre-trained model, many transfers): ``finetune.tasks``
maps each task's name to its own section (dataset, search, resources, ...); the keys beside ``tasks`` are
every task's defaults. Each task is a stage of its own (``finetune:NAME``, cached and resumed on its own),
registers as ``vit-NAME`` (``register_as``) with its own champion, and is evaluated on its own dataset
(``evaluate:NAME``, from the ``evaluate`` section's split); the workflow's run logs the transfer table.

    finetune:
      train: {total_steps: 300}                          # every task's, unless the task sets its own
      tasks:
        flowers17: {dataset: flowers17, search: {image_size: [32, 48], lr: {min: 0.003, max: 0.1}}}
        cifar10: {dataset: cifar10-small, search: {image_size: [32], lr: {min: 0.01, max: 0.03}}}
    evaluate: {split: test}

A spec may start from another: `extends: base.yaml` (relative to its own folder) merges the file over its
base, mapping by mapping; any other value (a scalar, a list) replaces the base's. Relative paths resolve
against the folder of the file that gives them. Errors name the file, the key path and the reason.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from pipeline.config import ShardConfig
from workflows.configs import FinetuneSettings, PretrainSettings, Tracking
from workflows.recipes import (
    merge,  # extends merges spec files as a recipe merges under a section
)

MODEL_URI = re.compile(r"models:/[^/@\s]+(/\d+|@[A-Za-z0-9_-]+)|models:/m-[0-9a-f]+|runs:/[0-9a-f]+/\S+")  # fullmatch
# user:password@ in a URI: it would be logged with the resolved spec. Credentials come from the environment.
CREDENTIALS_IN_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


class SpecError(ValueError):
    """A workflow spec that cannot run; the message names the file, the key path and the reason."""


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="a running cluster ('auto', ray://..., host:port); default: start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")


class PreprocessStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(..., description="an image folder, Parquet files or a manifest table (path or URI)")
    out: str | None = Field(None, description="shard folder (default: <workdir>/data/<stage name>)")
    config: ShardConfig = ShardConfig()
    workers: int | None = Field(None, ge=0, description="Ray tasks writing shards (0: in the stage's process)")


class PretrainStage(PretrainSettings):
    dataset: str = Field(..., description="the name of a preprocess stage")


class FinetuneStage(FinetuneSettings):
    dataset: str = Field(..., description="the name of a preprocess stage")
    pretrained: str | None = Field(None, description="a model URI; required when the spec has no pretrain stage")


class FinetuneTasks(BaseModel):
    """``finetune.tasks``: several downstream tasks, each a search of its own. Keys beside ``tasks`` are
    every task's defaults, merged under each task's own section as ``extends`` merges files; a task
    registers as ``vit-<task>`` unless it (or the defaults) sets ``register_as``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: dict[str, FinetuneStage]

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_each_task(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "tasks" not in data:
            return data
        tasks = data["tasks"]
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError(f"tasks: a mapping of task names to their sections (at least one), got {tasks!r}")
        shared = {key: value for key, value in data.items() if key != "tasks"}
        merged = {}
        for name, task in tasks.items():
            if task is not None and not isinstance(task, dict):
                raise ValueError(f"tasks.{name}: a mapping (the task's section), got {type(task).__name__}")
            section = merge(shared, task or {})
            section.setdefault("register_as", f"vit-{name}")
            merged[name] = section
        return {"tasks": merged}

    @model_validator(mode="after")
    def _names(self) -> FinetuneTasks:
        problems = [f"tasks.{name}: task names are letters, digits, '-' and '_'" for name in self.tasks
                    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name)]
        names: dict[str, str] = {}
        for name, task in self.tasks.items():
            if task.register_as is not None and task.register_as in names:
                problems.append(f"tasks.{name}.register_as: {task.register_as!r} is task {names[task.register_as]!r}'s "
                                "too; each task registers under a name of its own (its champion is compared on its test split)")
            names.setdefault(task.register_as, name)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _finetune_form(value: Any) -> str:
    return "tasks" if isinstance(value, FinetuneTasks) or (isinstance(value, dict) and "tasks" in value) else "one"


class EvaluateStage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = Field(None, description="the name of a preprocess stage; with finetune.tasks, each "
                                                  "task's own (leave it out)")
    split: str = "test"
    model: str | None = Field(None, description="a model URI; default: the finetune stage's model")
    batch_size: int = Field(64, ge=1)


class PredictStage(BaseModel):
    """``predict.NAME``: classify every image of ``source`` with a model of the workflow (or any model),
    one Parquet row per image (``vitflow predict``'s output) at ``out``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(..., description="an image folder, a Parquet or manifest table, or shards (path or URI)")
    out: str | None = Field(None, description="the Parquet file (default: <workdir>/predictions/<name>.parquet)")
    model: str | None = Field(None, description="a model URI; default: the fine-tuned model (with finetune.tasks: "
                                                "the model of `task`)")
    task: str | None = Field(None, description="with finetune.tasks: whose model predicts")
    batch_size: int | None = Field(None, ge=1)
    actors: int | None = Field(None, ge=1)
    top_k: int = Field(5, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    workdir: str = Field(".", description="where data, runs and the default MLflow store go (relative to the spec)")
    tracking: Tracking = Tracking()
    ray: RayConfig = RayConfig()
    storage_path: str | None = Field(None, description="checkpoints and Ray results (default: <workdir>/runs); a URI for clusters")
    preprocess: dict[str, PreprocessStage] = Field(default_factory=dict)
    pretrain: PretrainStage | None = None
    finetune: Annotated[Annotated[FinetuneStage, Tag("one")] | Annotated[FinetuneTasks, Tag("tasks")],
                        Discriminator(_finetune_form)] | None = None
    evaluate: EvaluateStage | None = None
    predict: dict[str, PredictStage] = Field(default_factory=dict)

    def predict_model(self, name: str) -> tuple[str | None, str | None]:
        """(the model URI ``predict.name`` names, else the stage whose model it takes)."""
        section = self.predict[name]
        if section.model is not None:
            return section.model, None
        return None, f"finetune:{section.task}" if section.task is not None else "finetune"

    def finetune_stages(self) -> dict[str, FinetuneStage]:
        """The fine-tuning searches by stage name: ``finetune`` for one task, ``finetune:NAME`` per task."""
        if self.finetune is None:
            return {}
        if isinstance(self.finetune, FinetuneTasks):
            return {f"finetune:{name}": task for name, task in self.finetune.tasks.items()}
        return {"finetune": self.finetune}

    def finetune_keys(self) -> dict[str, FinetuneStage]:
        """The fine-tuning sections by their key path in the spec (for errors)."""
        return {stage.replace(":", ".tasks."): section for stage, section in self.finetune_stages().items()}

    @model_validator(mode="after")
    def _wired(self) -> WorkflowSpec:
        problems = []
        training = {"pretrain": self.pretrain, **self.finetune_keys()}
        if self.evaluate is not None and self.evaluate.dataset is not None:
            training["evaluate"] = self.evaluate
        for key, stage in training.items():
            if stage is not None and stage.dataset not in self.preprocess:
                problems.append(f"{key}.dataset: {stage.dataset!r} is not a preprocess stage "
                                f"(have: {', '.join(self.preprocess) or 'none'})")
        for name in self.preprocess:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                problems.append(f"preprocess.{name}: stage names are letters, digits, '-' and '_'")
        for key, section in self.finetune_keys().items():
            if section.pretrained is None and self.pretrain is None:
                problems.append(f"{key}.pretrained: needed when the spec has no pretrain stage")
            if section.pretrained is not None and not _is_model_reference(section.pretrained):
                problems.append(f"{key}.pretrained: {section.pretrained!r} is not a model URI "
                                "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) or an existing folder")
            if self.pretrain is not None and section.pretrained is None:
                patch = self.pretrain.model.build(num_classes=1).patch_size
                bad = [size for size in section.search.image_size if size % patch]
                if bad:
                    problems.append(f"{key}.search.image_size: {bad} not divisible by the pre-trained patch size {patch}")
        for key, stage in {"pretrain": self.pretrain, **self.finetune_keys()}.items():
            distill = stage.train.distill if stage is not None else None
            if distill is not None and not _is_model_reference(distill.teacher):
                problems.append(f"{key}.train.distill.teacher: {distill.teacher!r} is not a model URI "
                                "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) or an existing folder")
        if self.evaluate is not None:
            tasks = isinstance(self.finetune, FinetuneTasks)
            if tasks and (self.evaluate.dataset is not None or self.evaluate.model is not None):
                given = "dataset" if self.evaluate.dataset is not None else "model"
                problems.append(f"evaluate.{given}: with finetune.tasks each task's model is evaluated on its own "
                                f"dataset; leave evaluate.{given} out (evaluate sets the split and batch size)")
            if not tasks and self.evaluate.dataset is None:
                problems.append("evaluate.dataset: needed (the name of a preprocess stage)")
            if self.evaluate.model is None and self.finetune is None:
                problems.append("evaluate.model: needed when the spec has no finetune stage")
            if self.evaluate.model is not None and not _is_model_reference(self.evaluate.model):
                problems.append(f"evaluate.model: {self.evaluate.model!r} is not a model URI or an existing folder")
        tasks = list(self.finetune.tasks) if isinstance(self.finetune, FinetuneTasks) else []
        for name, section in self.predict.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                problems.append(f"predict.{name}: stage names are letters, digits, '-' and '_'")
            if section.out is not None and not section.out.rstrip("/").lower().endswith(".parquet"):
                problems.append(f"predict.{name}.out: must name a .parquet file, got {section.out!r}")
            if section.model is not None:
                if not _is_model_reference(section.model):
                    problems.append(f"predict.{name}.model: {section.model!r} is not a model URI or an existing folder")
                if section.task is not None:
                    problems.append(f"predict.{name}.task: give a model or a task, not both")
            elif self.finetune is None:
                problems.append(f"predict.{name}.model: needed when the spec has no finetune stage")
            elif tasks and section.task not in tasks:
                problems.append(f"predict.{name}.task: {section.task!r} is not a task of finetune.tasks "
                                f"(have: {', '.join(tasks)})" if section.task else
                                f"predict.{name}.task: which task's model predicts (have: {', '.join(tasks)})")
            elif not tasks and section.task is not None:
                problems.append(f"predict.{name}.task: the spec's finetune has no tasks; leave task out")
        for where, uri in self._uris():
            if "\0" in uri:
                problems.append(f"{where}: holds a NUL character")
            elif CREDENTIALS_IN_URI.match(uri):
                problems.append(f"{where}: a password in the URI would be logged with the spec; give credentials "
                                "through the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*, RAY_AUTH_TOKEN)")
        if not (self.preprocess or self.pretrain or self.finetune or self.evaluate or self.predict):
            problems.append("the spec has no stages")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _uris(self) -> list[tuple[str, str]]:
        """(key path, value) of every address or path the spec gives."""
        found = [("workdir", self.workdir), ("tracking.uri", self.tracking.uri), ("ray.address", self.ray.address),
                 ("storage_path", self.storage_path)]
        for name, stage in self.preprocess.items():
            found += [(f"preprocess.{name}.source", stage.source), (f"preprocess.{name}.out", stage.out)]
        for name, stage in self.predict.items():
            found += [(f"predict.{name}.source", stage.source), (f"predict.{name}.out", stage.out)]
        return [(where, value) for where, value in found if value]


def _is_model_reference(value: str) -> bool:
    return bool(MODEL_URI.fullmatch(value)) or (bool(value.strip()) and Path(value).is_dir())


FORM_TAGS = ("one", "tasks")  # the finetune section's two forms (a Discriminator's tags in error locations)


def _location(parts) -> str:
    parts = list(parts)
    if len(parts) > 1 and parts[0] == "finetune" and parts[1] in FORM_TAGS:
        parts.pop(1)  # finetune.tasks.tasks.x -> finetune.tasks.x; finetune.one.search -> finetune.search
    return ".".join(str(part) for part in parts)


@functools.cache
def _key_names() -> frozenset[str]:
    """Every key a spec may hold, at any depth (pydantic models and the vit config dataclasses)."""
    import dataclasses
    import typing

    from vit import ViTConfig

    names: set[str] = set()
    pending: list[Any] = [WorkflowSpec, ViTConfig]
    seen: set[Any] = set()
    while pending:
        kind = pending.pop()
        if kind in seen:
            continue
        seen.add(kind)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            fields = {name: field.annotation for name, field in kind.model_fields.items()}
        elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
            fields = typing.get_type_hints(kind)
        else:
            for argument in typing.get_args(kind):  # list[X], X | None, dict[str, X]
                pending.append(argument)
            continue
        names.update(fields)
        pending.extend(fields.values())
    return frozenset(names)


def _problems(where: tuple, message: str) -> list[tuple[str, str]]:
    """A validator's message -> (key path, reason) pairs. Our validators name keys at the start of each
    problem ("batch_size must be ...", "finetune.pretrained: ...", "bogus: unknown key") and join
    problems with "; "; the vit config dataclasses prefix them with "invalid DataConfig: "."""
    keys = _key_names()
    message = re.sub(r"^invalid [A-Za-z]+Config: ", "", message)

    def named_key(part: str) -> tuple[str, str] | None:
        match = re.match(r"([A-Za-z_][\w.]*)(: | )", part)
        if match is None:
            return None
        key, separator = match.group(1), match.group(2)
        if separator == ": " or key.split(".")[0] in keys:
            return key, part[match.end():] if separator == ": " else part
        return None

    parts: list[str] = []
    for part in message.split("; "):
        if parts and named_key(part) is None:
            parts[-1] += f"; {part}"  # a reason that itself holds "; "
        else:
            parts.append(part)
    base = _location(where)
    result = []
    for part in parts:
        named = named_key(part)
        if named is None:
            result.append((base or "(top level)", part))
        else:
            result.append((f"{base}.{named[0]}" if base else named[0], named[1]))
    return result


def _format_errors(source: str, error: ValidationError) -> str:
    found: list[tuple[str, str]] = []
    for problem in error.errors():
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            found.append((_location(problem["loc"]), "unknown key"))
        elif problem["type"] == "value_error":
            found += _problems(problem["loc"], problem["msg"].removeprefix("Value error, "))
        else:
            found.append((_location(problem["loc"]) or "(top level)", problem["msg"]))
    found = list(dict.fromkeys(found))
    lines = [f"{source}: invalid workflow spec ({len(found)} problem{'s' if len(found) > 1 else ''})"]
    lines += [f"  {where}: {message}" for where, message in found]
    return "\n".join(lines)


def parse_spec(data: Any, path: Path, bases: Sequence[Path] = ()) -> WorkflowSpec:
    """``bases``: the files ``path`` extends, nearest first; errors name them beside ``path``."""
    source = f"{path} (extends {' -> '.join(map(str, bases))})" if bases else str(path)
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a workflow spec is a YAML mapping, got {type(data).__name__}")
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_format_errors(source, error)) from None


def load_spec(path: str | Path) -> tuple[WorkflowSpec, Path]:
    """The validated spec and the folder its relative paths resolve against (the file's own, not a base's)."""
    path = Path(path)
    data, bases = spec_document(path)
    base = path.resolve().parent
    data.setdefault("workdir", str(base))  # once, on the merged document: a base's folder is not the default
    return parse_spec(data, path, bases), base


def spec_document(path: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """The spec file's raw document with its ``extends`` chain merged in, each file's relative paths made
    absolute against that file's folder (``workdir`` stays out unless a file sets it), and the files it
    extends, nearest first (none for a spec that extends nothing)."""
    return _document(Path(path), ())


def _document(path: Path, extended_by: tuple[Path, ...]) -> tuple[dict[str, Any], list[Path]]:
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    data = _resolve_paths(_read_mapping(path, extended_by), path.resolve().parent)
    if "extends" not in data:
        return data, []
    value = data.pop("extends")
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{path}: extends: the path of the spec it builds on (a string), got {value!r}")
    base = Path(os.path.normpath(path.parent / value))  # an absolute value replaces path.parent
    try:
        found, resolved = base.is_file(), base.resolve()
    except (OSError, ValueError) as error:  # a NUL byte, a name too long for the file system
        raise SpecError(f"{path}: extends {value!r}: not a usable path ({error})") from None
    if not found:
        raise SpecError(f"{path}: extends {value!r}: no such file {resolved}")
    chain = (*reversed(extended_by), path)  # the top file first
    if resolved in {file.resolve() for file in chain}:
        raise SpecError(f"{chain[0]}: extends in a cycle: {' -> '.join(map(str, (*chain, base)))}")
    base_data, bases = _document(base, (path, *extended_by))
    return merge(base_data, data), [base, *bases]


def _read_mapping(path: Path, extended_by: tuple[Path, ...]) -> Any:
    """The file's YAML; a base file (one ``extended_by`` others) must be a mapping."""
    by = f" (extended by {extended_by[0]})" if extended_by else ""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}{by}: not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}{by}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise SpecError(f"{path}{by}: cannot be read ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}{by}: a workflow spec is a YAML mapping, got {type(data).__name__}")
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative local paths (workdir, sources, outputs, model folders) -> absolute, against ``base``, the
    folder of the file that gives them. A new mapping; sections are copied before they are changed."""
    data = dict(data)

    def absolute(value):
        if (isinstance(value, str) and "://" not in value and "\0" not in value
                and not value.startswith(("models:/", "runs:/"))):
            return str((base / value).resolve())
        return value

    for key in ("workdir", "storage_path"):
        if isinstance(data.get(key), str):
            data[key] = absolute(data[key])
    if isinstance(data.get("preprocess"), dict):
        data["preprocess"] = stages = dict(data["preprocess"])
        for name, stage in stages.items():
            if isinstance(stage, dict):
                stages[name] = {**stage, **{key: absolute(stage[key]) for key in ("source", "out")
                                            if isinstance(stage.get(key), str)}}
    def model_path(stage: Any, key: str) -> Any:
        if (isinstance(stage, dict) and isinstance(stage.get(key), str) and stage[key].strip()
                and not stage[key].startswith(("models:/", "runs:/"))):
            return {**stage, key: absolute(stage[key])}
        return stage

    for section, key in (("finetune", "pretrained"), ("evaluate", "model")):
        if section in data:
            data[section] = model_path(data[section], key)
    if isinstance(data.get("predict"), dict):
        data["predict"] = {name: model_path({**stage, **{key: absolute(stage[key]) for key in ("source", "out")
                                                          if isinstance(stage.get(key), str)}}, "model")
                           if isinstance(stage, dict) else stage for name, stage in data["predict"].items()}
    finetune = data.get("finetune")
    if isinstance(finetune, dict) and isinstance(finetune.get("tasks"), dict):
        data["finetune"] = {**finetune, "tasks": {name: model_path(task, "pretrained")
                                                  for name, task in finetune["tasks"].items()}}
    return data
