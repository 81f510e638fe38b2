"""Every stage's settings as typed, frozen pydantic models (pre-training, the fine-tuning search, evaluation): what a spec section or a stage's config file
may say, checked once at load time with the key's path in every error. This module imports no stage:
stages, the spec and the CLI import it."""

from __future__ import annotations

import dataclasses
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_serializer,
    field_validator,
    model_validator,
)

from vit import ViTConfig, decode_variant
from vit.data import DataConfig
from vit.finetune import FinetuneConfig, FinetuneMode, paper_finetune_optim
from vit.loop import TrainConfig
from vit.optim import OptimConfig
from workflows.recipes import RecipeError, apply_recipe


class ModelSpec(BaseModel):
    """A paper variant plus keyword overrides of ``ViTConfig`` (``num_classes`` comes from the data)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    variant: str = "Ti/16"
    image_size: int | tuple[int, int] = 224

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        """One clear error, not one per member of the union (``image_size.int``, ``image_size.tuple[...]``)."""
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (is_int(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_int, value)))):
            raise ValueError(f"must be an int or a (height, width) pair of ints, got {value!r}")
        return value

    @model_validator(mode="after")
    def _decodes(self) -> ModelSpec:
        self.build(num_classes=1)
        return self

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self, num_classes: int) -> ViTConfig:
        if "num_classes" in self.overrides():
            raise ValueError("num_classes is taken from the dataset; leave it out of the model section")
        unknown = sorted(set(self.overrides()) - {field.name for field in dataclasses.fields(ViTConfig)})
        if unknown:  # "KEY: reason", so the spec's error names the key's path
            raise ValueError("; ".join(f"{key}: unknown model option (not a ViTConfig field)" for key in unknown))
        return decode_variant(self.variant, image_size=self.image_size, num_classes=num_classes, **self.overrides())


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)

    def per_worker(self) -> dict[str, float]:
        """What one worker holds, as a Ray resource request."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str | None = None  # default: an SQLite store under the working directory
    experiment: str = "vitflow"
    offline_after_s: float = Field(
        120, ge=0, description="at the end of training, how long to wait for an unreachable tracking server "
        "before keeping the model and metrics locally for `vitflow upload`")


class PretrainSettings(BaseModel):
    """What pre-training does: the model, data, schedule and resources (the workflow spec's section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str | None = Field(None, description="a named training recipe (workflows/recipes, `vitflow recipe list`) "
                                                 "merged under this section: the section's own keys override it")
    train_split: str = "train"
    val_split: str = "val"
    model: ModelSpec = ModelSpec()
    data: DataConfig = DataConfig()
    train: TrainConfig
    resources: Resources = Resources()
    max_failures: int = Field(3, ge=0, description="worker-group restarts before the run fails")
    checkpoints_to_keep: int = Field(2, ge=1)
    register_as: str | None = "vit-pretrained"
    fail_at_step: int | None = Field(None, ge=1, description="fault drill: rank 0 raises once at this step")

    @model_validator(mode="before")
    @classmethod
    def _recipe_and_one_resolution(cls, data: Any) -> Any:
        """The recipe, if one is named, goes under the section's own keys (``workflows.recipes``). Then: the
        model's image_size is the resolution the loader crops to: a different data.image_size would be
        replaced by it, so it is refused by name (the same value, as a dump of this section holds, is fine)."""
        if isinstance(data, dict) and data.get("recipe") is not None:
            try:
                data = apply_recipe(data)
            except RecipeError as error:
                raise ValueError(f"recipe: {error}") from None
        if not (isinstance(data, dict) and isinstance(data.get("data"), dict) and "image_size" in data["data"]):
            return data
        try:
            size = ModelSpec.model_validate(data.get("model", {})).build(num_classes=1).image_size
        except (ValueError, TypeError):
            return data  # the model section's own error is reported by its validation
        if data["data"]["image_size"] != size[0]:
            raise ValueError(f"data.image_size: {data['data']['image_size']!r} is not the model's resolution "
                             f"{size[0]}: model.image_size sets it (remove data.image_size)")
        return data

    @model_validator(mode="after")
    def _consistent(self):
        size = self.model.build(num_classes=1).image_size
        if size[0] != size[1]:
            raise ValueError(f"model.image_size {size} must be square for the shard loader's crops")
        if self.data.image_size != size[0]:
            object.__setattr__(self, "data", DataConfig.from_dict({**self.data.to_dict(), "image_size": size[0]}))
        return self


class PretrainConfig(PretrainSettings):
    """``vitflow pretrain CONFIG``: one pre-training run, validated before anything starts."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="deterministic run name: running again with it resumes")
    dataset: str = Field(..., description="a shard folder written by `vitflow shard` (holds dataset.json)")
    storage_path: str = "vitflow-runs"
    tracking: Tracking = Tracking()


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(..., description="models:/vit-finetuned@champion, models:/name/3, runs:/<id>/model or a folder")
    dataset: str = Field(..., description="a shard folder (dataset.json)")
    split: str = "test"
    batch_size: int = Field(64, ge=1)
    figure_images: int = Field(8, ge=1, description="test images shown in the attention-rollout figure")
    tracking: Tracking = Tracking()


class PredictConfig(BaseModel):
    """Batch prediction (``workflows.stages.predict``): one Parquet row per image of ``source``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(..., description="models:/vit-flowers@champion, models:/name/3, runs:/<id>/model or a folder")
    source: str = Field(..., description="an image folder, a Parquet or manifest table, or shards; a path or URI")
    out: str = Field(..., description="the Parquet file to write: a path or an object-store URI")
    batch_size: int | None = Field(None, ge=1, description="images per forward pass; None: sized to memory")
    actors: int | None = Field(None, ge=1, description="model copies classifying in parallel; None: one per GPU, "
                                                        "else one per CPU (each reading its own images)")
    top_k: int = Field(5, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tracking: Tracking = Tracking()

    @field_validator("out")
    @classmethod
    def _a_parquet_file(cls, value: str) -> str:
        if not value.rstrip("/").lower().endswith(".parquet"):
            raise ValueError(f"out must name a .parquet file, got {value!r}")
        return value


def load_yaml_config(path: str | Path, model: type[BaseModel]):
    """A stage configuration file, validated by its pydantic ``model``."""
    import yaml

    with open(path) as handle:
        return model.model_validate(yaml.safe_load(handle) or {})


def absolute_uri(path: str) -> str:
    """A URI as it is, a local path made absolute: Ray workers run elsewhere (s3://, gs://, ...)."""
    return path if "://" in path else str(Path(path).resolve())


# --- fine-tuning: the search ------------------------------------------------------------------

METRIC = "val/top1"
MODES = {"val/top1": "max", "val/loss": "min"}  # what a search may compare trials on, and which way is better
# Fields of the stage's own configs that the search sets for every trial, with what sets them and what to
# do instead: each is refused in the section (a value there would be overwritten) and as a search choice,
# but for optim.lr: a choice of values in place of search.lr's draw (e.g. a divergence drill's lr).
SEARCH_OWNED = {
    "image_size": ("the search's search.image_size chooses the resolution (each trial's data and model)", "remove it"),
    "data.image_size": ("the search's search.image_size chooses the resolution (each trial's data and model)", "remove it"),
    "optim.lr": ("the search's search.lr chooses the learning rate (each trial draws one between its min and max)",
                 "remove it"),
    "train.optim": ("the optimiser is given in one place, the section's optim (finetune.optim in a workflow spec)",
                    "move it there"),
}
# What the search itself reads from the section (ASHA's max_t, when a trial has finished, the checks that
# checkpoints fall on evaluations): the same for every trial, so never a choice.
SECTION_WIDE = ("train.total_steps", "train.eval_every", "train.checkpoint_every")


class LogUniform(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float = Field(..., gt=0)
    max: float = Field(..., gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogUniform:
        if self.min >= self.max:
            raise ValueError(f"min {self.min} must be below max {self.max}")
        return self


class Scheduler(BaseModel):
    """ASHA on the search's metric (search.metric); rungs are counted in training steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grace_period: int = Field(..., ge=1, description="steps every trial runs before it may be stopped")
    reduction_factor: float = Field(2, gt=1)


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: list[PositiveInt] = Field(..., min_length=1, description="fine-tuning resolutions to choose from")
    lr: LogUniform
    choices: dict[str, list[Any]] = Field(default_factory=dict, description="more fields by dotted name (data.X, train.X, optim.X) or mode, e.g. train.label_smoothing; optim.lr replaces the lr draw")
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    scheduler: Scheduler | None = None
    search_alg: Literal["random", "optuna"] = "random"
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    seed: int = 0
    metric: Literal["val/top1", "val/loss"] = Field(
        METRIC, description="what ASHA stops trials on and the best trial is chosen by; val/loss when a small "
                            "validation set makes top-1 tie (every early trial predicting the same class)")

    @field_validator("choices")
    @classmethod
    def _known_fields(cls, choices: dict[str, list[Any]]) -> dict[str, list[Any]]:
        configs = {"data": DataConfig, "train": TrainConfig, "optim": OptimConfig}
        problems = []
        for name, values in choices.items():
            section, _, key = name.partition(".")
            if name == "mode":  # full or linear_probe, per trial
                pass
            elif section not in configs or not key:
                problems.append(f"{name}: choices name fields as data.X, train.X, optim.X or mode")
            elif key not in {field.name for field in fields(configs[section])}:
                problems.append(f"{name}: {configs[section].__name__} has no field {key!r}")
            elif name in SEARCH_OWNED and name != "optim.lr":  # optim.lr: a grid in place of search.lr's draw
                problems.append(f"{name}: not a choice: {SEARCH_OWNED[name][0]}")
            elif name == "train.distill":
                problems.append(f"{name}: not a choice: the teacher is checked and pinned once for the whole search; "
                                "give train.distill in the section (one teacher for every trial)")
            elif name == "train.time_budget_s":
                problems.append(f"{name}: not a choice: a search compares trials at equal steps, and a time "
                                "budget ends each at a step its machine's speed decides (train.total_steps does)")
            elif name in SECTION_WIDE:
                problems.append(f"{name}: not a choice: the search schedules every trial by the section's {name}")
            if not values:
                problems.append(f"{name}: give at least one value")
        if problems:
            raise ValueError("; ".join(problems))
        return choices


class FinetuneSettings(BaseModel):
    """What the search does: recipe, data, schedule, search space and resources (the spec's section).

    The recipe's fields (``vit.finetune.FinetuneConfig`` but its image size, which the search chooses) sit
    in the section itself; :meth:`recipe` puts them together for one resolution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    mode: FinetuneMode = "full"
    optim: OptimConfig = Field(default_factory=paper_finetune_optim,
                               description="every trial's optimiser (Appendix B.1.1); search.lr sets its lr")
    data: DataConfig = DataConfig()
    train: TrainConfig
    search: SearchConfig
    resources: Resources = Resources()
    register_as: str | None = "vit-finetuned"
    champion_alias: str = "champion"

    @model_validator(mode="before")
    @classmethod
    def _no_owned_keys(cls, data: Any) -> Any:
        """Keys that would be overwritten are refused by name, with where their value goes instead."""
        if not isinstance(data, dict):
            return data
        problems = []
        if "finetune" in data:  # the spelling before the recipe's fields moved up into the section
            problems.append("finetune: the recipe's keys now sit directly in the fine-tune section: write "
                            "finetune.optim / finetune.mode (optim: and mode: beside train: and search:)")
        for name, (reason, remedy) in SEARCH_OWNED.items():
            if _holds(data, name):
                problems.append(f"{name}: {reason}: {remedy}")
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @field_serializer("data", "train", "optim", mode="wrap")
    def _without_owned_keys(self, value: Any, handler, info) -> Any:
        """A dump (the stage's fingerprint, the trials' copy of the configuration) is a valid section again:
        it leaves out what the section refuses (data.image_size, train.optim, optim.lr)."""
        return {key: field for key, field in handler(value).items() if f"{info.field_name}.{key}" not in SEARCH_OWNED}

    @model_validator(mode="after")
    def _consistent(self):
        # The trials train with the section's optim: TrainConfig holds it (and checks its warmup_steps
        # against total_steps here, at load, not in a trial).
        object.__setattr__(self, "train", replace(self.train, optim=self.optim))
        self.recipe(self.search.image_size[0])  # e.g. linear_probe with optim.layer_decay, named at load
        if self.search.scheduler and self.search.scheduler.grace_period > self.train.total_steps:
            raise ValueError(f"search.scheduler.grace_period {self.search.scheduler.grace_period} exceeds "
                             f"train.total_steps {self.train.total_steps}")
        if self.train.time_budget_s is not None:
            raise ValueError(f"train.time_budget_s {self.train.time_budget_s:g}: a search compares its trials at "
                             "equal steps (ASHA's rungs, the best trial's validation), and a time budget ends each "
                             "trial at a step its machine's speed decides: set train.total_steps instead")
        if not self.train.eval_every:
            raise ValueError("train.eval_every must be set: the search compares trials on a validation metric")
        if self.train.checkpoint_every % self.train.eval_every:
            raise ValueError(f"train.checkpoint_every {self.train.checkpoint_every} must be a multiple of "
                             f"train.eval_every {self.train.eval_every}: trials report to Tune at evaluations")
        return self

    def recipe(self, image_size: int) -> FinetuneConfig:
        """The paper's recipe at one of the search's resolutions."""
        return FinetuneConfig(image_size=image_size, mode=self.mode, optim=self.optim)


def _holds(data: dict[str, Any], dotted: str) -> bool:
    """Whether the raw section ``data`` gives the key at the dotted path."""
    *parents, key = dotted.split(".")
    for parent in parents:
        data = data.get(parent)
        if not isinstance(data, dict):
            return False
    return key in data


class FinetuneSearchConfig(FinetuneSettings):
    """``vitflow finetune CONFIG``: the search, validated before anything starts."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    pretrained: str = Field(..., description="models:/vit-pretrained/3, models:/vit-pretrained@alias, runs:/<id>/model or a folder")
    dataset: str = Field(..., description="the downstream shard folder")
    storage_path: str = "vitflow-runs"
    tracking: Tracking = Tracking()
