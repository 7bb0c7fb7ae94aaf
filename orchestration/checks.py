"""The gates as blocking asset checks: a candidate that fails one goes no further down the graph.
The freshness checks on the champion, run by `freshness_schedule` (and from the UI)."""

import json
import time
from datetime import datetime, timezone

import dagster as dg

from orchestration.instance import labeled_batches
from orchestration.policy import AccuracyDrop, Freshness, freshness
from orchestration.resources import FlywheelHome
from training.registry import Registry


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


def current_freshness(instance: dg.DagsterInstance, flywheel: FlywheelHome) -> list[Freshness]:
    """The freshness verdicts now: the checks and `flywheel status` read them from here."""
    champion = Registry(flywheel.registry).champion()
    return freshness(champion.card() if champion else None, labeled_batches(instance), time.time(), flywheel.project.retraining)


def _freshness_result(context: dg.AssetCheckExecutionContext, flywheel: FlywheelHome, verdict: Freshness) -> dg.AssetCheckResult:
    if not verdict.passed:
        # Raised as failed runs are (run_failure_recorder): a warning in the run and a line in monitoring/.
        path = flywheel.root / "monitoring" / "freshness_alerts.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "check": verdict.check, "message": verdict.summary}) + "\n")
        context.log.warning(f"{verdict.check} failed: {verdict.summary}")
    return dg.AssetCheckResult(
        check_name=verdict.check,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=verdict.summary,
        metadata={
            "summary": verdict.summary,
            "waiting_batches": len(verdict.waiting_hours),
            "longest_wait_hours": round(max(verdict.waiting_hours.values(), default=0.0), 1),
        },
    )


# One evaluation gives both verdicts: the registry and the ingestion records are read once.
@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            "champion_fresh", asset="champion_model",
            description="The champion is no older than retraining.champion_max_age_hours while labeled batches ingested "
            "after it wait (an old champion with nothing new to learn passes).",
        ),
        dg.AssetCheckSpec(
            "labeled_batches_used", asset="champion_model",
            description="No labeled batch has waited longer than retraining.labeled_batch_max_wait_hours after its "
            "ingestion without a champion trained on it.",
        ),
    ],
)
def freshness_checks(context: dg.AssetCheckExecutionContext, flywheel: FlywheelHome):
    for verdict in current_freshness(context.instance, flywheel):
        yield _freshness_result(context, flywheel, verdict)
