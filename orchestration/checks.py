"""The gates as blocking asset checks: a candidate that fails one goes no further down the graph."""

import dagster as dg

from orchestration.policy import AccuracyDrop


def _gate_result(gate: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=gate["passed"],
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in gate["reasons"]))},
    )


@dg.asset_check(
    asset="model_evaluation",
    blocking=True,
    description="On paired predictions of the same test images (fp32): a first model clears the absolute floor; "
    "a candidate is shown not inferior to the champion overall (paired bootstrap bound, margin), regresses "
    "significantly on no batch or class slice (exact McNemar, Holm across slices), and its calibration does not "
    "worsen beyond the bound.",
)
def evaluation_gate(model_evaluation: dict) -> dg.AssetCheckResult:
    return _gate_result(model_evaluation["gate"])


@dg.asset_check(
    asset="exported_model",
    blocking=True,
    description="The ONNX export matches torch, int8 loses at most the allowed accuracy against fp32, "
    "and the int8 file is at most the allowed fraction of the fp32 file.",
)
def export_gate(exported_model: dict) -> dg.AssetCheckResult:
    return _gate_result(exported_model["export_gate"])


@dg.asset_check(
    asset="exported_model",
    blocking=True,
    description="The served model (int8 ONNX) against the champion's int8 model, by the evaluation gate's rules.",
)
def served_model_gate(exported_model: dict) -> dg.AssetCheckResult:
    return _gate_result(exported_model["served_gate"])


# Checks on drift_report are evaluated inside the asset (partitioned assets report checks per partition).
DRIFT_CHECK_SPECS = [
    dg.AssetCheckSpec(
        "batch_not_drifted", asset="drift_report",
        description="The batch looks like the champion's training data. Error when it drifted (image statistics "
        "or embeddings); warning when only some signals moved (a few features, or the predicted classes).",
    ),
    dg.AssetCheckSpec(
        "champion_accuracy_on_new_labels", asset="drift_report",
        description="On a labeled batch, the champion's accuracy is not significantly more than the retraining policy's "
        "margin below its test accuracy.",
    ),
]


def drift_check_results(report: dict, drop: AccuracyDrop | None) -> list[dg.AssetCheckResult]:
    moved = [f["feature"] for f in report["features"] if f["drifted"]]
    if report["predictions"]["drifted"]:
        moved.append("predicted classes")
    return [
        dg.AssetCheckResult(
            check_name="batch_not_drifted",
            passed=not report["drifted"] and not moved,
            severity=dg.AssetCheckSeverity.ERROR if report["drifted"] else dg.AssetCheckSeverity.WARN,
            metadata={"moved": ", ".join(moved) or "nothing", "embedding_p_value": report["embedding"]["p_value"]},
        ),
        dg.AssetCheckResult(
            check_name="champion_accuracy_on_new_labels",
            passed=drop is None or not drop.fell,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"accuracy_on_labels": "unlabeled"} if drop is None else {
                "accuracy_on_labels": drop.batch_accuracy, "labeled": drop.labeled, "test_accuracy": drop.test_accuracy,
                "floor": drop.floor, "p_value": drop.p_value,
            },
        ),
    ]
