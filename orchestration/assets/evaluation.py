"""Evaluation: the candidate and the current champion on the same current test set, and the gate."""

from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field
import polars as pl

from orchestration.metadata import accuracy_text, markdown_image, markdown_table, readable
from orchestration.resources import FlywheelHome
from training.config import ModelConfig
from training.gate import GateDecision, GatePolicy
from training.registry import FP32_FILE, Registry
from training.results import Metrics


# The test images the candidate got wrong with the most confidence, shown in its W&B evaluation run.
WORST_IMAGES = 16


class GateConfig(dg.Config):
    absolute_floor: float = Field(0.9, ge=0, le=1, description="Test accuracy a first model must reach.")
    non_inferiority_margin: float = Field(
        0.02, gt=0, le=1, description="Overall, the candidate must be shown not worse than the champion by more than this "
        "much accuracy (one-sided paired bootstrap bound on the same test images).",
    )
    level: float = Field(0.05, gt=0, lt=0.5, description="One-sided error level of the overall non-inferiority bound.")
    slice_level: float = Field(
        0.05, gt=0, lt=1, description="Family-wise error level of the per-slice regression tests (exact McNemar per batch "
        "and per class, Holm-Bonferroni across slices): a slice blocks only when its regression is significant.",
    )
    min_slice_size: int = Field(10, ge=1, description="Slices with fewer test images are reported, not tested.")
    max_ece_increase: float = Field(0.05, ge=0, le=1, description="How much the expected calibration error may worsen.")

    def policy(self) -> GatePolicy:
        return GatePolicy(**self.model_dump())


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
    from training.data import read_beton  # heavy: imported by the runs that use it (orchestration/__init__.py)
    from training.evaluate import TestSet, confusion_matrix_png, evaluate_models
    from training.inference import load_classifier, predict_onnx, predict_torch
    from training.tracking import log_evaluation

    test_split = ffcv_datasets["splits"]["test"]
    test = TestSet.load(Path(test_split["path"]), Path(test_split["index"]))
    model_config = ModelConfig.model_validate(trained_model["model"])
    candidate_network = load_classifier(Path(trained_model["weights_path"]), model_config)
    champion_version = Registry(flywheel.registry).champion()
    champion_session = champion_version.inference_session(FP32_FILE) if champion_version else None
    evaluation = evaluate_models(
        test, lambda images: predict_torch(candidate_network, images),
        (lambda images: predict_onnx(champion_session, images)) if champion_session else None,
        model_config.num_classes, config.policy(), "fp32",
    )
    candidate, champion, decision = evaluation.candidate, evaluation.champion, evaluation.gate
    plot = confusion_matrix_png(
        candidate.confusion, ffcv_datasets["classes"], flywheel.reports / context.run_id / "confusion_matrix.png",
        f"candidate {trained_model['attempt'][:8]}: accuracy {candidate.accuracy:.3f}",
    )
    for reason in decision.reasons:
        context.log.info(f"gate: {reason}")
    worst, confidence = evaluation.worst_misclassified(test.labels, WORST_IMAGES)
    # Read back from the split's file by row: the test images are streamed, never all in memory.
    images = dict(zip(np.sort(worst).tolist(), read_beton(Path(test_split["path"]), indices=np.sort(worst))[0])) if len(worst) else {}
    wandb_run = log_evaluation(
        f"evaluate-{trained_model['attempt'][:8]}", candidate.to_dict(), ffcv_datasets["classes"],
        [
            {"image": images[row], "label": int(test.labels[row]), "predicted": int(evaluation.candidate_logits[row].argmax()),
             "confidence": float(p), "batch": str(test.slices[row])}
            for row, p in zip(worst.tolist(), confidence)
        ],
        flywheel.root,
    )

    value = {
        "candidate": candidate.to_dict(),
        "champion": champion.to_dict() if champion else None,
        "champion_version": champion_version.version if champion_version else None,
        "gate": decision.model_dump(),
        # The export judges the served int8 files by the same policy.
        "gate_policy": config.policy().model_dump(),
        "confusion_matrix_png": str(plot),
        "wandb_run": wandb_run,
    }
    return dg.Output(
        value,
        metadata=readable({
            "candidate_accuracy": accuracy_text(candidate.accuracy, candidate.count),
            "candidate_macro_f1": candidate.macro_f1,
            "candidate_ece": candidate.ece,
            "champion_version": champion_version.version if champion_version else "none",
            "champion_accuracy": accuracy_text(champion.accuracy, champion.count) if champion else "none",
            "test_examples": candidate.count,
            "gate_passed": decision.passed,
            **overall_metadata(decision),
            "gate_reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
            "per_batch": markdown_table(batch_table(candidate, champion)),
            "gate_slices": markdown_table(slice_table(decision)),
            "per_class": markdown_table(pl.DataFrame(candidate.per_class).with_columns(
                pl.Series("name", [ffcv_datasets["classes"][row["class"]] for row in candidate.per_class])
            )),
            "confusion_matrix": markdown_image(plot, "confusion matrix"),
            "wandb_run": wandb_run,
        }),
    )


def batch_table(candidate: Metrics, champion: Metrics | None) -> pl.DataFrame:
    return pl.DataFrame([
        {
            "batch": name,
            "examples": info["count"],
            "candidate": round(info["accuracy"], 4),
            "champion": round(champion.slices[name]["accuracy"], 4) if champion and name in champion.slices else None,
        }
        for name, info in candidate.slices.items()
    ])


def slice_table(decision: GateDecision) -> pl.DataFrame:
    """The gate's per-slice tests, the most significant first."""
    rows = [
        {"slice": s.slice, "images": s.examples, "candidate right": s.candidate_correct, "champion right": s.champion_correct,
         "p (Holm)": None if s.p_holm is None else round(s.p_holm, 4), "regressed": s.regressed}
        for s in decision.slices
    ]
    return pl.DataFrame(rows).sort("p (Holm)", nulls_last=True) if rows else pl.DataFrame({"slice": []})


def overall_metadata(decision: GateDecision) -> dict:
    overall = decision.overall
    if overall is None:
        return {}
    return {
        "accuracy_difference": overall.difference,
        "accuracy_difference_ci95": f"{overall.ci95_low:+.4f} to {overall.ci95_high:+.4f}",
        "accuracy_difference_lower_bound": overall.lower_bound,
    }
