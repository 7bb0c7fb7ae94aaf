"""The results that cross modules: an evaluation's metrics, the int8 export's trials and report, and
the export gate's limits. Plain data with no heavy imports, so the model card, and everything that
reads cards (the CLI, the Dagster definitions), load without torch, ONNX Runtime or FFCV."""

from __future__ import annotations

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
class RecipeTrial:
    recipe: str
    accuracy: float
    latency_ms_batch64: float
    bytes: int
    passed_accuracy_gate: bool


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

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy


@dataclass(frozen=True)
class ExportGatePolicy:
    """The export gate's limits; their defaults live in `orchestration.assets.deployment.ExportConfig`."""

    max_accuracy_drop: float  # int8 may lose at most this much top-1 accuracy against fp32
    max_size_ratio: float  # int8 file at most this fraction of the fp32 file
    max_parity_diff: float  # largest |torch logit - ONNX fp32 logit|
