"""The model card: the typed contract of `registry/<version>/card.json` (DESIGN.md's model contract).

Every reader (promotion, monitoring, the retraining policy, `flywheel status` and `predict`, W&B)
validates the JSON into `ModelCard` and reads attributes, so a card that lacks a field fails at
load, naming the field, not deep inside whoever reads it first.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from training.calibration import Calibration
from training.config import AugmentConfig, ModelConfig, OptimConfig
from training.gate import GateDecision
from training.results import ExportGatePolicy, ExportReport, Int8Drop, Metrics, RecipeTrial


class InputSpec(BaseModel, frozen=True):
    name: Literal["image"] = "image"
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    height: int
    width: int
    channels: Literal[3] = 3
    # How images become that input (transforms.images.Preprocessing); the defaults are what cards
    # written before these fields existed meant.
    resize: str = "squash"
    mode: str = "rgb"


class OutputSpec(BaseModel, frozen=True):
    name: Literal["logits"] = "logits"
    dtype: Literal["float32"] = "float32"


class SliceMetrics(BaseModel, frozen=True):
    count: int
    accuracy: float
    macro_f1: float
    ece: float


class CardMetrics(BaseModel, frozen=True):
    test_accuracy: float
    test_macro_f1: float
    test_ece: float
    test_examples: int
    test_accuracy_onnx_fp32: float
    test_accuracy_int8: float
    test_ece_int8: float
    val_accuracy: float
    per_batch: dict[str, SliceMetrics]


class ExportSummary(BaseModel, frozen=True):
    fp32_bytes: int
    int8_bytes: int
    parity_max_abs_diff: float
    exporter: str
    int8_recipe: str
    int8_recipe_trials: list[RecipeTrial]
    # False when the recipe remembered for this architecture and machine was reused without a search.
    int8_recipe_searched: bool = True
    settings: ExportGatePolicy
    int8_drop: Int8Drop | None = None  # the int8 file against fp32 on the test images (cards written before it had none)


class GateVerdict(BaseModel, frozen=True):
    passed: bool
    reasons: list[str]


class CardGates(BaseModel, frozen=True):
    evaluation: GateDecision  # fp32 candidate against the champion's fp32 model
    export: GateVerdict  # ONNX parity, int8 accuracy drop and size
    served: GateDecision  # int8 candidate against the champion's int8 model

    @property
    def all_passed(self) -> bool:
        return self.evaluation.passed and self.export.passed and self.served.passed


class Lineage(BaseModel, frozen=True):
    training_batches: list[str]
    training_attempt: str
    parent_champion: str | None
    tuned_from: str | None = None  # "<study> trial <n>" when the training took a tune run's values
    training_mode: Literal["full", "incremental"] = "full"  # incremental: the parent fine-tuned on new batches and a replay sample
    compared_with_champion: str | None
    code_version: str
    wandb_run_id: str | None
    dagster_run_id: str
    inputs_fingerprint: str


class ModelCard(BaseModel, frozen=True):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    version: str = ""  # given by the registry when it publishes the card
    created_at: datetime
    class_names: list[str]
    input: InputSpec
    output: OutputSpec = OutputSpec()
    model: ModelConfig
    augment: AugmentConfig | None = None  # the training recipe (cards before recipes have none)
    optim: OptimConfig | None = None  # the optimisation settings, tuned ones included (older cards have none)
    metrics: CardMetrics
    # The served (int8) model's temperature on the validation split, for accuracy estimates before labels
    # (cards from before it have none: no estimate).
    calibration: Calibration | None = None
    export: ExportSummary
    gates: CardGates
    lineage: Lineage

    @model_validator(mode="after")
    def _one_name_per_output(self) -> "ModelCard":
        if len(self.class_names) != self.model.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model of {self.model.num_classes} outputs")
        return self


def build_card(
    model: ModelConfig, class_names: list[str], resize: str, mode: str, candidate: Metrics, val_accuracy: float, report: ExportReport, export_settings: ExportGatePolicy,
    evaluation_gate: GateDecision, export_gate: GateVerdict, served_ece: float, served_gate: GateDecision,
    lineage: Lineage, augment: AugmentConfig, optim: OptimConfig | None, calibration: Calibration | None = None,
) -> ModelCard:
    """The card of a candidate exported to ONNX: what it is, how it scored, and what the gates said."""
    return ModelCard(
        created_at=datetime.now(timezone.utc),
        class_names=class_names,
        input=InputSpec(height=model.resolution, width=model.resolution, resize=resize, mode=mode),
        model=model,
        augment=augment,
        optim=optim,
        calibration=calibration,
        metrics=CardMetrics(
            test_accuracy=candidate.accuracy,
            test_macro_f1=candidate.macro_f1,
            test_ece=candidate.ece,
            test_examples=candidate.count,
            test_accuracy_onnx_fp32=report.fp32_accuracy,
            test_accuracy_int8=report.int8_accuracy,
            test_ece_int8=served_ece,
            val_accuracy=val_accuracy,
            per_batch=candidate.slices,
        ),
        export=ExportSummary(
            fp32_bytes=report.fp32_bytes,
            int8_bytes=report.int8_bytes,
            parity_max_abs_diff=report.parity_max_abs_diff,
            exporter="torch.onnx.export(dynamo=True)",
            int8_recipe=report.int8_recipe,
            int8_recipe_trials=report.recipe_trials,
            int8_recipe_searched=report.int8_recipe_searched,
            settings=export_settings,
            int8_drop=report.int8_drop,
        ),
        gates=CardGates(evaluation=evaluation_gate, export=export_gate, served=served_gate),
        lineage=lineage,
    )
