"""The promotion gate: statistical decisions on paired predictions of the same test images.

- Overall, the candidate must be *not inferior* to the champion: the one-sided lower confidence
  bound of the accuracy difference (candidate - champion) must lie above `-non_inferiority_margin`.
  The bound comes from a paired bootstrap over test images, which is exact for this statistic when
  drawn as a multinomial over the three kinds of pair (only the candidate right, only the champion
  right, both the same), so its cost does not grow with the test set.
- Per slice (each batch, each class, of at least `min_slice_size` images), a one-sided exact McNemar
  test asks whether the candidate gets significantly fewer images right; the p-values are adjusted
  across all slices with Holm-Bonferroni, and a slice blocks only when its regression is significant
  after the adjustment. Two images of 26 are noise; a forgotten class or batch is not.
- Calibration: the candidate's expected calibration error may exceed the champion's by at most
  `max_ece_increase`.
- A first model (no champion) must reach `absolute_floor` accuracy.

Every decision carries its reasons in words, for the check metadata, the model card and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

BOOTSTRAP_RESAMPLES = 20_000


class GatePolicy(BaseModel, frozen=True):
    """The gate's settings; their defaults and descriptions live in the Dagster config
    (`orchestration.assets.evaluation.GateConfig`)."""

    absolute_floor: float
    non_inferiority_margin: float
    level: float
    slice_level: float
    min_slice_size: int
    max_ece_increase: float


@dataclass(frozen=True)
class ModelAnswers:
    """One model's answers on the test set: the predicted class of each image, and its calibration."""

    predictions: np.ndarray
    ece: float


class OverallComparison(BaseModel):
    examples: int
    candidate_accuracy: float
    champion_accuracy: float
    only_candidate_right: int
    only_champion_right: int
    difference: float
    ci95_low: float
    ci95_high: float
    lower_bound: float  # one-sided, at 1 - level
    not_inferior: bool


class SliceComparison(BaseModel):
    slice: str  # "batch <id>" or "class <index>"
    examples: int
    candidate_correct: int
    champion_correct: int
    p_value: float | None  # one-sided exact McNemar; None when the slice is below min_slice_size
    p_holm: float | None
    regressed: bool

    def explain(self) -> str:
        fewer = self.champion_correct - self.candidate_correct
        counts = f"{self.slice}: {fewer} of {self.examples} fewer right ({self.candidate_correct} vs {self.champion_correct})"
        if self.p_holm is None:
            return f"{counts}: too few images to judge"
        verdict = "a significant regression: blocked" if self.regressed else "noise, not a regression"
        return f"{counts}, p={self.p_holm:.2g} after Holm: {verdict}"


class GateDecision(BaseModel):
    passed: bool
    reasons: list[str]
    model: str  # which files were judged, e.g. "fp32" or "int8"
    overall: OverallComparison | None = None
    slices: list[SliceComparison] = []


def paired_difference_bounds(
    only_candidate: int, only_champion: int, examples: int, level: float
) -> tuple[float, float, float]:
    """(lower bound at 1 - level, 95% interval low, high) of the paired accuracy difference, by a
    percentile bootstrap over the test images (seeded: the same answers give the same decision)."""
    if only_candidate + only_champion == 0:
        return 0.0, 0.0, 0.0
    shares = np.array([only_candidate, only_champion, examples - only_candidate - only_champion]) / examples
    draws = np.random.default_rng(0).multinomial(examples, shares, size=BOOTSTRAP_RESAMPLES)
    differences = (draws[:, 0] - draws[:, 1]) / examples
    low95, high95 = np.quantile(differences, [0.025, 0.975])
    return float(np.quantile(differences, level)), float(low95), float(high95)


def compare_overall(labels: np.ndarray, candidate: np.ndarray, champion: np.ndarray, policy: GatePolicy) -> OverallComparison:
    candidate_right, champion_right = candidate == labels, champion == labels
    only_candidate = int((candidate_right & ~champion_right).sum())
    only_champion = int((champion_right & ~candidate_right).sum())
    examples = len(labels)
    lower, low95, high95 = paired_difference_bounds(only_candidate, only_champion, examples, policy.level)
    return OverallComparison(
        examples=examples,
        candidate_accuracy=float(candidate_right.mean()),
        champion_accuracy=float(champion_right.mean()),
        only_candidate_right=only_candidate,
        only_champion_right=only_champion,
        difference=(only_candidate - only_champion) / examples,
        ci95_low=low95,
        ci95_high=high95,
        lower_bound=lower,
        not_inferior=lower > -policy.non_inferiority_margin,
    )


def compare_slices(
    labels: np.ndarray, batches: np.ndarray, candidate: np.ndarray, champion: np.ndarray, policy: GatePolicy
) -> list[SliceComparison]:
    """Each batch and each class: exact one-sided McNemar on the discordant pairs, Holm across slices."""
    # Imported here: the decision's types are part of the model card, which loads without scipy.
    from scipy.stats import binomtest
    from statsmodels.stats.multitest import multipletests

    candidate_right, champion_right = candidate == labels, champion == labels
    members = [(f"batch {b}", batches == b) for b in sorted(set(batches.tolist()))]
    members += [(f"class {c}", labels == c) for c in sorted(set(labels.tolist()))]
    rows, p_values = [], []
    for name, member in members:
        examples = int(member.sum())
        only_champion = int((champion_right & ~candidate_right & member).sum())
        discordant = only_champion + int((candidate_right & ~champion_right & member).sum())
        p_value = None
        if examples >= policy.min_slice_size:
            p_value = float(binomtest(only_champion, discordant, 0.5, alternative="greater").pvalue) if discordant else 1.0
            p_values.append(p_value)
        rows.append((name, examples, int(candidate_right[member].sum()), int(champion_right[member].sum()), p_value))
    rejected, adjusted = (
        multipletests(p_values, alpha=policy.slice_level, method="holm")[:2] if p_values else ([], [])
    )
    tested = iter(zip(rejected, adjusted))
    comparisons = []
    for name, examples, candidate_correct, champion_correct, p_value in rows:
        regressed, p_holm = next(tested) if p_value is not None else (False, None)
        comparisons.append(SliceComparison(
            slice=name, examples=examples, candidate_correct=candidate_correct, champion_correct=champion_correct,
            p_value=p_value, p_holm=None if p_holm is None else float(p_holm), regressed=bool(regressed),
        ))
    return comparisons


def promotion_decision(
    labels: np.ndarray, batches: np.ndarray, candidate: ModelAnswers, champion: ModelAnswers | None,
    policy: GatePolicy, model: str,
) -> GateDecision:
    """Whether the candidate may replace the champion, judged on `model` ("fp32", "int8") files."""
    accuracy = float((candidate.predictions == labels).mean()) if len(labels) else 0.0
    if champion is None:
        passed = accuracy >= policy.absolute_floor
        return GateDecision(passed=passed, model=model, reasons=[
            f"first model ({model}): test accuracy {accuracy:.4f} {'>=' if passed else '<'} floor {policy.absolute_floor:.4f}"
        ])
    overall = compare_overall(labels, candidate.predictions, champion.predictions, policy)
    confidence = f"{100 * (1 - policy.level):.0f}%"
    reasons = [
        f"overall ({model}): candidate {overall.candidate_accuracy:.4f} vs champion {overall.champion_accuracy:.4f} on "
        f"{overall.examples} test images, difference {overall.difference:+.4f} (95% CI {overall.ci95_low:+.4f} to "
        f"{overall.ci95_high:+.4f}); one-sided {confidence} lower bound {overall.lower_bound:+.4f} "
        + (f"> -{policy.non_inferiority_margin}: not inferior" if overall.not_inferior
           else f"<= -{policy.non_inferiority_margin}: it may be worse by more than the margin: blocked")
    ]
    slices = compare_slices(labels, batches, candidate.predictions, champion.predictions, policy)
    worse = [s for s in slices if s.champion_correct > s.candidate_correct]
    reasons += [s.explain() for s in sorted(worse, key=lambda s: (not s.regressed, s.p_holm if s.p_holm is not None else 2.0))]
    reasons.append(f"{len(slices) - len(worse)} other slice(s) with no fewer images right")
    ece_ok = candidate.ece <= champion.ece + policy.max_ece_increase
    reasons.append(
        f"calibration ({model}): ECE {candidate.ece:.4f} vs champion {champion.ece:.4f} "
        + ("(within" if ece_ok else "(worse beyond") + f" the allowed +{policy.max_ece_increase})"
    )
    passed = overall.not_inferior and not any(s.regressed for s in slices) and ece_ok
    return GateDecision(passed=passed, reasons=reasons, model=model, overall=overall, slices=slices)
