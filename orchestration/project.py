"""The project part of `$FLYWHEEL_HOME/flywheel.yaml`: what every stage must agree on about the data.

    classes: [cat, dog, fox]     # optional: else discovered from the first labeled landing
    resolution: 64               # square training and serving size in pixels
    resize: center_crop          # squash (default), center_crop or letterbox
    mode: rgb                    # rgb (default) or grayscale
    retraining:                  # when the loop retrains (orchestration.policy.RetrainingPolicy)
      schedule: "0 3 * * 1"      # cron, UTC: weekly on Monday at 03:00 (default)
      accuracy_margin: 0.05      # retrain when labeled batch accuracy < test accuracy - this,
      accuracy_significance: 0.05  # significantly at this level (a one-sided test of two proportions)
      max_attempts: 2            # tries of a retraining that ends without a gate verdict

The same file holds per-asset run settings (`orchestration.settings`). With no file, the digits
default runs as it always has.
"""

from pathlib import Path

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestration.policy import RetrainingPolicy
from training.config import ModelConfig
from transforms.classes import class_name, class_name_problem
from transforms.images import ImageMode, Preprocessing, ResizePolicy


class SettingsError(Exception):
    """A settings file that cannot be used; the message names the file, the entry and the reason."""


class Project(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    classes: list[str] = Field(
        default_factory=list, description="Class names in index order. Empty: discovered from the first labeled "
        "landing (integer labels: the digits' 0..9). Classes already stored must stay first; append new ones.",
    )
    resolution: int = ModelConfig.model_fields["resolution"]
    resize: ResizePolicy = Field("squash", description="To the square input: squash (stretch), center_crop or letterbox.")
    mode: ImageMode = Field("rgb", description="rgb, or grayscale for scans and other images whose colour means nothing.")
    retraining: RetrainingPolicy = Field(
        default_factory=RetrainingPolicy, description="When the loop retrains: schedule, accuracy margin, attempts.",
    )

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.resolution, self.resize, self.mode)

    @field_validator("classes")
    @classmethod
    def _names(cls, classes: list[str]) -> list[str]:
        classes = [class_name(name) for name in classes]
        for name in classes:
            if problem := class_name_problem(name):
                raise ValueError(problem)
        duplicated = sorted({name for name in classes if classes.count(name) > 1})
        if duplicated:
            raise ValueError(f"listed more than once: {', '.join(duplicated)}")
        if len(classes) == 1:
            raise ValueError("a classifier needs at least two classes")
        return classes


PROJECT_KEYS = tuple(Project.model_fields)


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SettingsError(f"{path}: not a readable YAML file ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: expected a mapping of setting -> value, got {type(raw).__name__}")
    return raw


def validation_message(path: Path, error: pydantic.ValidationError, prefix: str = "") -> str:
    """`prefix` names the section ("trained_model."); an error of the whole section has no field."""
    return f"{path}: " + "; ".join(
        f"{(prefix + '.'.join(map(str, e['loc']))).rstrip('.')}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
    )


def load_project(path: Path) -> Project:
    """The project settings of the file, or the defaults when there is no file."""
    if not path.exists():
        return Project()
    raw = read_yaml(path)
    try:
        return Project.model_validate({key: raw[key] for key in PROJECT_KEYS if key in raw})
    except pydantic.ValidationError as error:
        raise SettingsError(validation_message(path, error)) from None
