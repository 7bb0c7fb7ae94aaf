"""The retraining policy (DESIGN.md), in one place: used by the sensors, the schedule and `flywheel run`.

Retrain when there is no champion; when a batch the champion has not trained on drifted; when the
champion's accuracy on a batch's new labels falls more than `accuracy_margin` below its test
accuracy; or when the schedule is due.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetrainingPolicy:
    accuracy_margin: float = 0.05  # champion accuracy on new labels may trail its test accuracy by this much


@dataclass(frozen=True)
class RetrainingDecision:
    retrain: bool
    reasons: list[str] = field(default_factory=list)


def decide(
    champion_card: dict | None,
    drift_reports: list[dict],
    schedule_due: bool = False,
    policy: RetrainingPolicy = RetrainingPolicy(),
) -> RetrainingDecision:
    """`drift_reports` are `drift_report` values of the batches to consider."""
    if champion_card is None:
        return RetrainingDecision(True, ["there is no champion yet"])
    trained_on = set(champion_card["lineage"]["training_batches"])
    reasons = []
    for report in drift_reports:
        batch = report["batch_id"]
        if batch in trained_on or report["champion"] != champion_card["version"]:
            continue  # the champion already learned from it, or the report is about another champion
        if report["drifted"]:
            reasons.append(
                f"batch {batch} drifted ({100 * report['drifted_share']:.0f}% of image statistics, "
                f"embedding MMD p={report['embedding']['p_value']:.3f})"
            )
        accuracy = report["champion_accuracy"]
        floor = champion_card["metrics"]["test_accuracy"] - policy.accuracy_margin
        if accuracy is not None and accuracy < floor:
            reasons.append(
                f"champion accuracy on batch {batch}'s labels is {accuracy:.3f}, below its test accuracy "
                f"{champion_card['metrics']['test_accuracy']:.3f} - margin {policy.accuracy_margin}"
            )
    if schedule_due:
        reasons.append("the retraining schedule is due")
    return RetrainingDecision(bool(reasons), reasons)
