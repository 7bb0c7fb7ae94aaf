"""The gates as blocking asset checks: a candidate that fails one goes no further down the graph."""

import dagster as dg


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
