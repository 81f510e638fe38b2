"""Every stage's settings as typed, frozen pydantic models: what a spec section or a stage's config file
may say, checked once at load time with the key's path in every error. This module imports no stage:
stages, the spec and the CLI import it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vit import ViTConfig, decode_variant
from vit.data import DataConfig
from vit.loop import TrainConfig


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
    def _one_resolution(cls, data: Any) -> Any:
        """The model's image_size is the resolution the loader crops to: a different data.image_size would be
        replaced by it, so it is refused by name (the same value, as a dump of this section holds, is fine)."""
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


def load_yaml_config(path: str | Path, model: type[BaseModel]):
    """A stage configuration file, validated by its pydantic ``model``."""
    import yaml

    with open(path) as handle:
        return model.model_validate(yaml.safe_load(handle) or {})


def absolute_uri(path: str) -> str:
    """A URI as it is, a local path made absolute: Ray workers run elsewhere (s3://, gs://, ...)."""
    return path if "://" in path else str(Path(path).resolve())
