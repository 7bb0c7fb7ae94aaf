"""The retraining policy and the loop's memory (DESIGN.md), in one place: the drift sensor and the
schedule apply it, and `flywheel run` evaluates those very sensors.

Retrain when there is no champion; when a batch the champion has not trained on drifted; when the
champion's accuracy on a batch's labels is significantly more than `accuracy_margin` below its test
accuracy (`accuracy_drop`); when its accuracy estimated before labels is (`estimated_drop`, opt-in); or when the schedule is due. Drift and accuracy are answered by an
incremental retraining (the champion fine-tuned on what it has not seen and a replay sample), the
schedule, new code and a first model by a full one (`training_mode`). Freshness (`freshness`): the
champion must not grow stale while newer labeled data waits, nor labeled data wait unused too long.

The memory is the Dagster instance itself: every retraining run carries the key of what it answers
and trains on (the champion it would replace, the training data's version, the run settings, the
code version), and how that run ended decides what happens next. A candidate its gates rejected is
not trained again until one of those changes; a retraining that ended without a verdict (a crash) is
tried again, up to `max_attempts` times for the same key, and one whose `flywheel run` process was
killed is resumed whenever; a retraining that is
still running is waited for, and whatever arrived meanwhile is answered after it.
"""

import hashlib
import json
from dataclasses import dataclass, field

import dagster as dg
import numpy as np
# Dagster's own check of the cron strings it accepts for a schedule.
from dagster._utils.schedules import is_valid_cron_string
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestration.instance import ABANDONED_TAG
from training.card import ModelCard

RETRAINING_KEY_TAG = "flywheel/retraining"
REASON_TAG = "flywheel/reason"
MODE_TAG = "flywheel/training_mode"
ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
GATE_CHECKS = ("evaluation_gate", "export_gate", "served_model_gate")


class RetrainingPolicy(BaseModel):
    """The loop's tunables: `retraining:` in the project file, read by the sensors, the schedule and
    the drift checks at each use (the schedule's cron when the code location loads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: str = Field(
        "0 3 * * 1", description="Cron (UTC) of the scheduled retraining on all labeled data; weekly by default.",
    )
    accuracy_margin: float = Field(
        0.05, ge=0, le=1, description="Retrain when the champion's accuracy on a batch's new labels falls this far below its test accuracy.",
    )
    accuracy_significance: float = Field(
        0.05, gt=0, lt=1, description="...and the fall beyond the margin is significant at this level (one-sided test of two "
        "proportions: the batch's labeled images against the test split), so a small batch needs a larger fall.",
    )
    estimated_accuracy_margin: float | None = Field(
        None, ge=0, le=1, description="Retrain when the champion's accuracy on an unlabeled batch, estimated from its calibrated "
        "confidences (the drift report's estimate before labels), is below its test accuracy by more than this, the whole "
        "interval below; off (null) by default: the estimate misses under covariate shift, where drift already answers.",
    )
    incremental: bool = Field(
        True, description="Answer drift and accuracy falls by fine-tuning the champion on the batches it has not trained on "
        "and a replay sample of the rest (trained_model's incremental_* settings); the schedule, new code, a changed network "
        "or recipe, and having no champion retrain in full.",
    )
    champion_max_age_hours: float = Field(
        168, gt=0, description="The check champion_fresh fails when the champion is older than this while labeled batches "
        "ingested after it wait.",
    )
    labeled_batch_max_wait_hours: float = Field(
        24, gt=0, description="The check labeled_batches_used fails when a labeled batch has waited this long after its "
        "ingestion without a champion trained on it.",
    )
    freshness_schedule: str = Field("17 * * * *", description="Cron (UTC) of the freshness checks; hourly by default.")
    max_attempts: int = Field(
        2, ge=1, description="Tries of one retraining (same champion, data, settings and code) that end without a gate verdict.",
    )

    @field_validator("schedule", "freshness_schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        if not is_valid_cron_string(schedule):
            raise ValueError(f"{schedule!r} is not a cron schedule (minute hour day-of-month month day-of-week, e.g. '0 3 * * 1')")
        return schedule


@dataclass(frozen=True)
class AccuracyDrop:
    """The champion's accuracy on a batch's labels against its accuracy on its test split (both int8, as served)."""

    batch_accuracy: float
    labeled: int
    test_accuracy: float
    test_examples: int
    floor: float  # test accuracy - margin
    p_value: float  # H0: the batch's accuracy is at least the floor
    fell: bool

    def describe(self, batch: str) -> str:
        return (
            f"champion accuracy on batch {batch}'s labels is {self.batch_accuracy:.3f} ({self.labeled} images), below its "
            f"test accuracy {self.test_accuracy:.3f} ({self.test_examples} images) - margin {self.test_accuracy - self.floor:.2f} "
            f"(p={self.p_value:.3g})"
        )


def accuracy_drop(report: dict, card: ModelCard, policy: RetrainingPolicy) -> AccuracyDrop | None:
    """None for an unlabeled batch. A point estimate on a few dozen images misses the test accuracy by
    several points by chance alone; the test asks whether the fall beyond the margin is real."""
    if report["champion_accuracy"] is None or not report["labeled_rows"]:
        return None
    # Here, not at the top: statsmodels takes seconds to import, and loading the definitions needs none of it.
    from statsmodels.stats.proportion import test_proportions_2indep

    tested, test_examples = card.metrics.test_accuracy_int8, card.metrics.test_examples
    labeled = report["labeled_rows"]
    # Agresti-Caffo's interval for a difference, sound when an accuracy is 1 (its odds ratio, unused, divides by zero).
    with np.errstate(divide="ignore", invalid="ignore"):
        result = test_proportions_2indep(
            round(tested * test_examples), test_examples, round(report["champion_accuracy"] * labeled), labeled,
            value=policy.accuracy_margin, compare="diff", alternative="larger",
        )
    return AccuracyDrop(
        batch_accuracy=report["champion_accuracy"], labeled=labeled, test_accuracy=tested, test_examples=test_examples,
        floor=tested - policy.accuracy_margin, p_value=float(result.pvalue),
        fell=bool(result.pvalue < policy.accuracy_significance),
    )


def estimated_drop(report: dict, card: ModelCard, policy: RetrainingPolicy) -> str | None:
    """Why an unlabeled batch's estimated accuracy asks for a retraining, or None: only when the policy
    acts on estimates, and only before labels (once they come, `accuracy_drop` judges)."""
    estimate = report.get("estimated_accuracy")  # reports before estimates have none
    if policy.estimated_accuracy_margin is None or estimate is None or report["labeled_rows"]:
        return None
    floor = card.metrics.test_accuracy_int8 - policy.estimated_accuracy_margin
    if estimate["high"] >= floor:
        return None
    return (
        f"champion accuracy on unlabeled batch {report['batch_id']} is estimated at {estimate['accuracy']:.3f} "
        f"(interval {estimate['low']:.3f}-{estimate['high']:.3f}, {estimate['images']} images), below its test accuracy "
        f"{card.metrics.test_accuracy_int8:.3f} - margin {policy.estimated_accuracy_margin:.2f}"
    )


@dataclass(frozen=True)
class RetrainingDecision:
    retrain: bool
    reasons: list[str] = field(default_factory=list)
    scheduled: bool = False


def training_mode(champion_card: ModelCard | None, policy: RetrainingPolicy, code: str, scheduled: bool) -> tuple[str, str]:
    """(trained_model's mode, why) for a retraining the policy launches. The training itself falls back
    to full when the champion's network or recipe differs from its own, or when a full retraining would
    train fewer examples (`training_plan`)."""
    if not policy.incremental:
        return "full", "retraining.incremental is off"
    if champion_card is None:
        return "full", "there is no champion to fine-tune"
    if scheduled:
        return "full", "the schedule retrains on all labeled data from scratch"
    if champion_card.lineage.code_version != code:
        return "full", f"the code changed since the champion {champion_card.version} was trained"
    return "incremental", f"the champion {champion_card.version} is fine-tuned on what it has not seen and a replay sample"


def decide(
    champion_card: ModelCard | None, drift_reports: list[dict], policy: RetrainingPolicy, schedule_due: bool = False,
) -> RetrainingDecision:
    """`drift_reports`: the latest `drift_report` value of each batch."""
    if champion_card is None:
        return RetrainingDecision(True, ["there is no champion yet"])
    trained_on = set(champion_card.lineage.training_batches)
    reasons = []
    for report in drift_reports:
        batch = report["batch_id"]
        if batch in trained_on or report["champion"] != champion_card.version:
            continue  # the champion already learned from it, or the report is about another champion
        if report["drifted"]:
            reasons.append(
                f"batch {batch} drifted ({100 * report['drifted_share']:.0f}% of image statistics, "
                f"embedding MMD p={report['embedding']['p_value']:.3f})"
            )
        drop = accuracy_drop(report, champion_card, policy)
        if drop is not None and drop.fell:
            reasons.append(drop.describe(batch))
        if (estimated := estimated_drop(report, champion_card, policy)) is not None:
            reasons.append(estimated)
    if schedule_due:
        reasons.append("the retraining schedule is due")
    return RetrainingDecision(bool(reasons), reasons, scheduled=schedule_due)


@dataclass(frozen=True)
class Freshness:
    """One freshness check's verdict."""

    check: str  # champion_fresh or labeled_batches_used
    passed: bool
    summary: str
    waiting_hours: dict[str, float]  # the labeled batches it is about -> hours since their ingestion


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def freshness(
    champion_card: ModelCard | None, labeled_batches: dict[str, float], now: float, policy: RetrainingPolicy,
) -> list[Freshness]:
    """`labeled_batches`: batch -> ingestion time (epoch seconds) of every labeled batch. A stale
    champion alone is no alarm (nothing new to learn); a stale champion while labeled data newer than
    it waits is, and so is any labeled batch left unused too long."""
    trained_on = set(champion_card.lineage.training_batches) if champion_card else set()
    unused = {batch: at for batch, at in labeled_batches.items() if batch not in trained_on}

    def listing(batches: dict[str, float]) -> str:
        ordered = sorted(batches, key=batches.get)
        return ", ".join(f"{b} ({_hours(now - batches[b])})" for b in ordered[:5]) + (", ..." if len(ordered) > 5 else "")

    if champion_card is None:
        champion = Freshness("champion_fresh", True, "no champion yet", {})
    else:
        born = champion_card.created_at.timestamp()
        newer = {batch: at for batch, at in unused.items() if at > born}
        limit = policy.champion_max_age_hours * 3600
        stale = now - born > limit and bool(newer)
        summary = (
            f"champion {champion_card.version} is {_hours(now - born)} old (limit {_hours(limit)})"
            + (f"; {len(newer)} labeled batch(es) ingested since wait: {listing(newer)}" if newer else "; no labeled batch ingested since")
        )
        champion = Freshness("champion_fresh", not stale, summary, {b: (now - at) / 3600 for b, at in newer.items()})
    wait = policy.labeled_batch_max_wait_hours * 3600
    overdue = {batch: at for batch, at in unused.items() if now - at > wait}
    used = Freshness(
        "labeled_batches_used", not overdue,
        f"{len(overdue)} labeled batch(es) waited longer than {_hours(wait)} for a champion trained on them: {listing(overdue)}"
        if overdue else f"{len(unused)} labeled batch(es) not yet trained on, none waiting longer than {_hours(wait)}",
        {b: (now - at) / 3600 for b, at in overdue.items()},
    )
    return [champion, used]


def retraining_key(champion: str | None, data_version: str, run_config: dict, code: str, occasion: str = "") -> str:
    """What a retraining trains on and answers; `occasion` sets apart retrainings the schedule asks for."""
    inputs = {"champion": champion, "data": data_version, "run_config": run_config, "code": code, "occasion": occasion}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Memory:
    launch: bool
    attempt: int  # the attempt to launch, counting from 1
    reason: str  # why not, when not


def _gate_verdict(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The gates that failed in a run (empty when the run never got to a verdict)."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return [
        e.dagster_event.event_specific_data.check_name for e in events
        if e.dagster_event.event_specific_data.check_name in GATE_CHECKS and not e.dagster_event.event_specific_data.passed
    ]


def recall(instance: dg.DagsterInstance, key: str, max_attempts: int) -> Memory:
    """Whether the retraining with this key should be launched now, from how earlier runs of it ended."""
    runs = [r.dagster_run for r in instance.get_run_records(dg.RunsFilter(tags={RETRAINING_KEY_TAG: key}))]
    if any(run.status in ACTIVE for run in runs):
        return Memory(False, 0, "this retraining is already queued or running")
    if any(run.status == dg.DagsterRunStatus.SUCCESS for run in runs):
        return Memory(False, 0, "this retraining already ran and its candidate was promoted")
    for run in runs:
        failed_gates = _gate_verdict(instance, run.run_id)
        if failed_gates:
            return Memory(False, 0, (
                f"this retraining already ran (run {run.run_id[:8]}) and its candidate failed the "
                f"{', '.join(failed_gates)}: waiting for new data, labels, settings or code"
            ))
    # A run whose `flywheel run` process was killed never got to finish: it is resumed, not counted.
    failed = [run for run in runs if run.tags.get(ABANDONED_TAG) != "true"]
    if len(failed) >= max_attempts:
        return Memory(False, 0, (
            f"this retraining failed {len(failed)} times without a gate verdict (last run {failed[0].run_id[:8]}): "
            "waiting for new data, labels, settings or code"
        ))
    return Memory(True, len(runs) + 1, "")


def retraining_active(instance: dg.DagsterInstance, job_name: str) -> bool:
    """A retraining queued or running: never queue a second one."""
    return bool(instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=ACTIVE), limit=1))
