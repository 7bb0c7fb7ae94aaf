"""What `flywheel run` and `flywheel status` print."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from orchestration.io_manager import stored_values
from orchestration.resources import FlywheelHome
from training.registry import Registry

if TYPE_CHECKING:  # `flywheel status` loads no Dagster definitions
    from flywheel.loop import TickReport


def _table(rows: list[dict]) -> str:
    # Wide enough for the drift history's columns on one line each (polars wraps headers to fit ~100 characters).
    with pl.Config(tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=250):
        return str(pl.DataFrame(rows))


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def champion_lines(flywheel: FlywheelHome) -> list[str]:
    champion = Registry(flywheel.registry).champion()
    if champion is None:
        return ["champion: none yet"]
    card = champion.card()
    metrics, export, lineage = card.metrics, card.export, card.lineage
    return [
        f"champion: {champion.version}  ({champion.path})",
        f"  test accuracy  fp32 {metrics.test_accuracy:.4f}   int8 {metrics.test_accuracy_int8:.4f}"
        f"   on {metrics.test_examples} test images",
        f"  model size     fp32 {_kib(export.fp32_bytes)}   int8 {_kib(export.int8_bytes)}"
        f"   ({export.int8_bytes / export.fp32_bytes:.2f}x)",
        f"  classes        {', '.join(card.class_names[:20])}" + (f", ... ({len(card.class_names)})" if len(card.class_names) > 20 else ""),
        f"  trained on     {', '.join(lineage.training_batches)}",
        f"  parent         {lineage.parent_champion or 'none'}   {lineage.training_mode} training   W&B run {lineage.wandb_run_id}",
        f"  promoted       {card.gates.evaluation.reasons[0]}",
    ]


def _drift_rows(reports: list[dict]) -> list[dict]:
    return [
        {
            "batch": r["batch_id"],
            "champion": r["champion"],
            "drifted features": f"{sum(f['drifted'] for f in r['features'])}/{len(r['features'])}",
            "embedding p": round(r["embedding"]["p_value"], 3),
            "drift": "DRIFT" if r["drifted"] else "-",
            "champion accuracy": "unlabeled" if r["champion_accuracy"] is None else f"{r['champion_accuracy']:.3f}",
            "estimated before labels": _estimate_text(r.get("estimated_accuracy"), r.get("estimate_trusted", True)),  # reports before estimates have none
            "estimate error": "-" if not r.get("estimate_check") else
            f"{100 * r['estimate_check']['error']:+.1f} pts{'' if r['estimate_check']['covered'] else ' (outside)'}",
        }
        for r in reports
    ]


def _estimate_text(estimate: dict | None, trusted: bool) -> str:
    if not estimate:
        return "-"
    return f"{estimate['accuracy']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]" + ("" if trusted else " drifted: not trusted")


def print_tick_summary(report: TickReport, flywheel: FlywheelHome) -> None:
    print()
    print("== flywheel run ==")
    print(f"landed {len(report.landed)} batch(es); ingested now: {', '.join(report.ingested) or 'none'}")
    if report.idle:
        print(report.idle)
    for name, message in report.failed.items():
        print(f"FAILED {name}: {message}")
    if report.drift:
        print("drift (each batch against the champion's training data):")
        print(_table(_drift_rows(list(report.drift.values()))))
    if report.decision:
        decision = report.decision
        print(f"retraining: {'yes' if decision.retrain else 'no'}" + (f" — {'; '.join(decision.reasons)}" if decision.reasons else ""))
    if report.candidate:
        evaluation, export = report.candidate["evaluation"], report.candidate.get("export")
        name = export["version"] if export else "the candidate"
        gates = ", ".join(f"{gate} FAILED" for gate in report.candidate["failed_gates"]) or "every gate passed"
        print(f"candidate {name}: {gates}")
        reasons = evaluation["gate"]["reasons"] + (export["export_gate"]["reasons"] + export["served_gate"]["reasons"] if export else [])
        for reason in reasons:
            print(f"  - {reason}")
        # Before/after on each batch the loop just reacted to: the champion then vs the candidate now.
        slices = evaluation["candidate"]["slices"]
        for batch, drift in report.drift.items():
            if drift["champion_accuracy"] is not None and batch in slices and drift["champion"] == report.champion_before:
                print(f"  batch {batch}: {drift['champion']} accuracy {drift['champion_accuracy']:.3f} (whole batch) -> "
                      f"candidate {slices[batch]['accuracy']:.3f} (its {slices[batch]['count']} test images)")
    if report.drift_after:
        print(f"drift against the new champion {report.champion_after}:")
        print(_table(_drift_rows(list(report.drift_after.values()))))
    if report.champion_before != report.champion_after:
        print(f"champion: {report.champion_before or 'none'} -> {report.champion_after}")
    for line in champion_lines(flywheel):
        print(line)


def freshness_lines(flywheel: FlywheelHome) -> list[str]:
    from orchestration.checks import current_freshness
    from orchestration.instance import get_instance

    return [
        f"  {verdict.check:<21}{'ok  ' if verdict.passed else 'FAIL'}  {verdict.summary}"
        for verdict in current_freshness(get_instance(flywheel.root), flywheel)
    ]


def print_status(flywheel: FlywheelHome) -> None:
    registry = Registry(flywheel.registry)
    for line in champion_lines(flywheel):
        print(line)
    print("\nfreshness:")
    for line in freshness_lines(flywheel):
        print(line)
    versions = registry.versions()
    if versions:
        champion = registry.champion()
        print("\nversions:")
        rows = []
        for version in versions:
            card = version.card()
            rows.append({
                "version": version.version + (" *" if champion and champion.version == version.version else ""),
                "created": card.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                "test acc": round(card.metrics.test_accuracy, 4),
                "int8 acc": round(card.metrics.test_accuracy_int8, 4),
                "eval gate": "pass" if card.gates.evaluation.passed else "FAIL",
                "export gate": "pass" if card.gates.export.passed else "FAIL",
                "served gate": "pass" if card.gates.served.passed else "FAIL",
                "parent": card.lineage.parent_champion or "-",
            })
        print(_table(rows))
    history = stored_values(flywheel, "drift_report")
    if history:
        print("\ndrift history:")
        print(_table(_drift_rows(history)))
        print(f"  drift over time: {flywheel.reports / 'drift_over_time.png'}")
        grids = flywheel.reports / "drift_samples"
        for report in history[-5:]:
            grid = grids / f"{report['batch_id']}.png"
            if grid.exists():
                print(f"  batch {report['batch_id']} beside the champion's training images: {grid}")
    queues = [(value["batch_id"], len(value["queued"]), value["tasks"]) for value in stored_values(flywheel, "labeling_queue") if value["queued"]]
    if queues:
        print("\nlabeling queue (import into Label Studio; `flywheel labels import` brings the labels back):")
        for batch_id, count, tasks in queues:
            print(f"  batch {batch_id}: {count} image(s) to label, {tasks}")
