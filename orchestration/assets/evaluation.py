"""Evaluation: the candidate and the current champion on the same current test set, and the gate."""

from pathlib import Path

import dagster as dg
from pydantic import Field
import polars as pl

from orchestration.metadata import markdown_image, markdown_table
from orchestration.resources import FlywheelHome
from training.config import ModelConfig
from training.evaluate import GatePolicy, TestSet, confusion_matrix_png, evaluate_onnx, evaluate_torch, gate_decision
from training.registry import Registry


class GateConfig(dg.Config):
    absolute_floor: float = Field(0.9, ge=0, le=1, description="Test accuracy a first model must reach.")
    tolerance: float = Field(0.0, ge=0, le=1, description="How far a candidate may trail the champion overall (0: non-regression).")
    slice_margin: float = Field(0.02, ge=0, le=1, description="How far any batch slice may regress (2 points: noise on an old domain does not block learning a new one).")


@dg.asset(
    description="Accuracy, macro-F1, calibration (ECE), per-class and per-batch metrics and the confusion "
    "matrix of the candidate and the champion on the current test set, and the promotion gate's decision.",
    group_name="evaluation",
    kinds={"pytorch", "onnx"},
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: GateConfig,
    flywheel: FlywheelHome,
    ffcv_datasets: dict,
    trained_model: dict,
) -> dg.Output[dict]:
    test_split = ffcv_datasets["splits"]["test"]
    test = TestSet.load(Path(test_split["path"]), Path(test_split["index"]))
    model_config = ModelConfig.model_validate(trained_model["model"])
    candidate = evaluate_torch(Path(trained_model["weights_path"]), model_config, test)

    champion_version = Registry(flywheel.registry).champion()
    champion = None
    if champion_version is not None:
        champion = evaluate_onnx(champion_version.fp32, model_config.num_classes, test)
    decision = gate_decision(
        candidate, champion, GatePolicy(config.absolute_floor, config.tolerance, config.slice_margin)
    )
    plot = confusion_matrix_png(
        candidate.confusion, flywheel.reports / context.run_id / "confusion_matrix.png",
        f"candidate {trained_model['attempt'][:8]}: accuracy {candidate.accuracy:.3f}",
    )
    for reason in decision.reasons:
        context.log.info(f"gate: {reason}")

    slices = pl.DataFrame(
        [
            {
                "batch": name,
                "examples": info["count"],
                "candidate": round(info["accuracy"], 4),
                "champion": round(champion.slices[name]["accuracy"], 4) if champion and name in champion.slices else None,
            }
            for name, info in candidate.slices.items()
        ]
    )
    value = {
        "candidate": candidate.to_dict(),
        "champion": champion.to_dict() if champion else None,
        "champion_version": champion_version.version if champion_version else None,
        "gate": decision.to_dict(),
        "confusion_matrix_png": str(plot),
    }
    return dg.Output(
        value,
        metadata={
            "candidate_accuracy": candidate.accuracy,
            "candidate_macro_f1": candidate.macro_f1,
            "candidate_ece": candidate.ece,
            "champion_version": champion_version.version if champion_version else "none",
            "champion_accuracy": champion.accuracy if champion else float("nan"),
            "test_examples": candidate.count,
            "gate_passed": decision.passed,
            "gate_reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "per_batch": markdown_table(slices),
            "per_class": markdown_table(pl.DataFrame(candidate.per_class)),
            "confusion_matrix": markdown_image(plot, "confusion matrix"),
        },
    )
