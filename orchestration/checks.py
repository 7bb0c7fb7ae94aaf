"""The gates as blocking asset checks: a candidate that fails one goes no further down the graph."""

import dagster as dg

from orchestration.policy import RetrainingPolicy


def _gate_result(gate: dict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=gate["passed"],
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in gate["reasons"]))},
    )


@dg.asset_check(
    asset="model_evaluation",
    blocking=True,
    description="The candidate clears the absolute floor (first model), does not trail the champion "
    "overall on the current test set, and regresses on no batch slice by more than the margin.",
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


# Checks on drift_report are evaluated inside the asset (partitioned assets report checks per partition).
DRIFT_CHECK_SPECS = [
    dg.AssetCheckSpec(
        "batch_not_drifted", asset="drift_report",
        description="The batch looks like the champion's training data. Error when it drifted (image statistics "
        "or embeddings); warning when only some signals moved (a few features, or the predicted classes).",
    ),
    dg.AssetCheckSpec(
        "champion_accuracy_on_new_labels", asset="drift_report",
        description="On a labeled batch, the champion's accuracy stays within the retraining policy's margin of its test accuracy.",
    ),
]


def drift_check_results(report: dict) -> list[dg.AssetCheckResult]:
    moved = [f["feature"] for f in report["features"] if f["drifted"]]
    if report["predictions"]["drifted"]:
        moved.append("predicted classes")
    accuracy, tested = report["champion_accuracy"], report["champion_test_accuracy"]
    floor = tested - RetrainingPolicy().accuracy_margin
    return [
        dg.AssetCheckResult(
            check_name="batch_not_drifted",
            passed=not report["drifted"] and not moved,
            severity=dg.AssetCheckSeverity.ERROR if report["drifted"] else dg.AssetCheckSeverity.WARN,
            metadata={"moved": ", ".join(moved) or "nothing", "embedding_p_value": report["embedding"]["p_value"]},
        ),
        dg.AssetCheckResult(
            check_name="champion_accuracy_on_new_labels",
            passed=accuracy is None or accuracy >= floor,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"accuracy_on_labels": accuracy if accuracy is not None else "unlabeled", "floor": floor},
        ),
    ]
