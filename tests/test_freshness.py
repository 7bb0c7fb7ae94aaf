"""Freshness: a stale champion while newer labeled data waits, and labeled batches left unused, as
rules and as asset checks run by a real Dagster instance."""

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from orchestration.policy import RetrainingPolicy, freshness
from tests.conftest import model_card, write_servable_files
from training.registry import Registry

HOUR = 3600.0
POLICY = RetrainingPolicy(champion_max_age_hours=168, labeled_batch_max_wait_hours=24)


def verdicts(card, batches: dict[str, float], now: float) -> dict[str, tuple[bool, str]]:
    return {v.check: (v.passed, v.summary) for v in freshness(card, batches, now, POLICY)}


def test_a_stale_champion_fails_only_while_newer_labeled_data_waits_and_an_unused_batch_only_after_its_wait():
    card = model_card(training_batches=("a",)).model_copy(update={"version": "v0001"})
    born = card.created_at.timestamp()
    trained = {"a": born - HOUR}

    # Old, but nothing new to learn: fresh enough.
    result = verdicts(card, trained, born + 200 * HOUR)
    assert result["champion_fresh"] == (True, "champion v0001 is 200.0 h old (limit 168.0 h); no labeled batch ingested since")
    assert result["labeled_batches_used"][0]

    # A labeled batch ingested after it, 190 h ago: both fail, and say which batch and how long.
    result = verdicts(card, trained | {"b": born + 10 * HOUR}, born + 200 * HOUR)
    assert result["champion_fresh"] == (
        False, "champion v0001 is 200.0 h old (limit 168.0 h); 1 labeled batch(es) ingested since wait: b (190.0 h)",
    )
    assert result["labeled_batches_used"] == (
        False, "1 labeled batch(es) waited longer than 24.0 h for a champion trained on them: b (190.0 h)",
    )

    # A young champion with the same batch waiting 10 h: both pass; at 30 h only the wait fails.
    assert all(passed for passed, _ in verdicts(card, trained | {"b": born + 10 * HOUR}, born + 20 * HOUR).values())
    result = verdicts(card, trained | {"b": born + 10 * HOUR}, born + 40 * HOUR)
    assert result["champion_fresh"][0] and not result["labeled_batches_used"][0]

    # No champion at all: nothing to be stale, but labeled data left unused still fails.
    result = verdicts(None, {"b": born}, born + 30 * HOUR)
    assert result["champion_fresh"] == (True, "no champion yet") and not result["labeled_batches_used"][0]


def test_the_freshness_job_runs_both_checks_on_the_champion_and_raises_a_failure(home: Path):
    from orchestration.definitions import defs
    from orchestration.instance import get_instance

    instance = get_instance(home)
    registry = Registry(home / "registry")
    staging = registry.staging_dir("test")
    write_servable_files(staging)
    # A champion from 2026-01-01 that trained on batch "a"; batch "b" (labeled) and "c" (unlabeled) came later.
    registry.promote(registry.publish(staging, model_card(training_batches=("a",))).version, reason="test")
    instance.add_dynamic_partitions("batches", ["a", "b", "c"])
    for batch, labeled in (("a", 100), ("b", 40), ("c", 0)):
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_images", partition=batch, metadata={"labeled": labeled}))

    def run() -> dict[str, dg.AssetCheckEvaluation]:
        result = defs.resolve_job_def("check_freshness").execute_in_process(instance=instance, raise_on_error=False)
        assert result.success
        return {e.check_name: e for e in result.get_asset_check_evaluations()}

    checks = run()
    assert set(checks) == {"champion_fresh", "labeled_batches_used"}
    # "b" waits behind a champion months old: stale. It has waited seconds, not 24 h: used passes.
    assert not checks["champion_fresh"].passed and "b (" in checks["champion_fresh"].description
    assert checks["champion_fresh"].severity == dg.AssetCheckSeverity.ERROR
    assert checks["labeled_batches_used"].passed
    alerts = [json.loads(line) for line in (home / "monitoring" / "freshness_alerts.jsonl").read_text().splitlines()]
    assert [a["check"] for a in alerts] == ["champion_fresh"]

    # A limit of a few seconds: the wait fails too. With "b" trained on by a new champion, both pass.
    (home / "flywheel.yaml").write_text("retraining:\n  labeled_batch_max_wait_hours: 0.0001\n")
    import time

    time.sleep(0.5)
    assert not run()["labeled_batches_used"].passed
    staging = registry.staging_dir("test2")
    write_servable_files(staging)
    fresh = model_card(training_batches=("a", "b")).model_copy(update={"created_at": datetime.now(timezone.utc)})
    registry.promote(registry.publish(staging, fresh).version, reason="test")
    assert all(check.passed for check in run().values())
