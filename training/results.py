"""The results that cross modules: an evaluation's metrics, the int8 export's trials and report, and
the export gate's limits. Plain data with no heavy imports, so the model card, and everything that
reads cards (the CLI, the Dagster definitions), load without torch, ONNX Runtime or FFCV."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Metrics:
    count: int
    accuracy: float
    macro_f1: float
    ece: float
    per_class: list[dict] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    slices: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Int8Drop:
    """An int8 file against its fp32 file on the same test images: the images only one of them gets
    right, and the one-sided lower confidence bound of the accuracy int8 loses, at the export gate's level."""

    examples: int
    only_fp32_right: int
    only_int8_right: int
    lower_bound: float

    @property
    def drop(self) -> float:
        return (self.only_fp32_right - self.only_int8_right) / self.examples if self.examples else 0.0

    def within(self, max_drop: float) -> bool:
        """Not significantly more than `max_drop`."""
        return self.lower_bound <= max_drop + 1e-9


@dataclass(frozen=True)
class RecipeTrial:
    recipe: str
    accuracy: float
    latency_ms_batch64: float
    bytes: int
    passed_accuracy_gate: bool  # its drop against fp32 is not significantly above the limit
    within_size_limit: bool = True  # the export gate's max_size_ratio (cards written before it had none)
    drop: Int8Drop | None = None  # (cards written before it had none)

    @property
    def acceptable(self) -> bool:
        """Passes the export gate's accuracy and size limits: a recipe the search may choose."""
        return self.passed_accuracy_gate and self.within_size_limit


@dataclass(frozen=True)
class ExportReport:
    fp32_path: str
    int8_path: str
    fp32_bytes: int
    int8_bytes: int
    parity_max_abs_diff: float
    fp32_accuracy: float
    int8_accuracy: float
    int8_recipe: str
    recipe_trials: list[RecipeTrial]
    int8_recipe_searched: bool  # False: the recipe remembered for this architecture and machine was reused
    int8_drop: Int8Drop | None = None  # the chosen recipe's (cards written before it had none)

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy


@dataclass(frozen=True)
class ExportGatePolicy:
    """The export gate's limits; their defaults live in `orchestration.assets.deployment.ExportConfig`."""

    max_accuracy_drop: float  # int8 may lose at most this much top-1 accuracy against fp32 ...
    max_size_ratio: float  # int8 file at most this fraction of the fp32 file
    max_parity_diff: float  # largest |torch logit - ONNX fp32 logit|
    level: float = 0.05  # ... refused when its drop is above that at this one-sided significance level


@dataclass(frozen=True)
class FitResult:
    """What a training reports (`result.json`, written by its rank 0), whichever launcher ran it."""

    weights_path: str
    best_checkpoint: str
    val_accuracy: float
    val_loss: float
    train_accuracy: float
    epochs_completed: int
    global_step: int
    resumed_from_step: int
    world_size: int
    train_seconds: float
    wandb_run_id: str | None
    wandb_run_dir: str | None
    accelerator: str
    precision: str
    compiled: bool
    loader_threads: int
    # From the second training batch (StepTimer): what the first costs is warm-up, not training speed.
    warmup_seconds: float
    images_per_s: float
    step_images_per_s: float
    loader_wait_share: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def metadata(self) -> dict:
        """What the training reports to Dagster (through Pipes), whichever launcher ran it."""
        reported = asdict(self)
        return {
            **{key: reported[key] for key in (
                "val_accuracy", "val_loss", "train_accuracy", "epochs_completed", "global_step", "resumed_from_step",
                "world_size", "train_seconds", "accelerator", "precision", "compiled", "loader_threads", "warmup_seconds",
                "images_per_s", "step_images_per_s", "loader_wait_share",
            )},
            "wandb_run_id": self.wandb_run_id or "",
            "weights_path": {"raw_value": self.weights_path, "type": "path"},
        }
