"""Accuracy before labels: temperature scaling on the validation split and confidence-based estimates
with intervals, on draws whose true probabilities are known; the policy acts on them only when asked."""

import numpy as np
import pytest
from scipy.special import softmax

from orchestration.policy import RetrainingPolicy, decide
from tests.test_drift_policy import card, report
from training.calibration import estimate_accuracy, estimate_error, fit_temperature

CLASSES = 10


def draw(rng: np.random.Generator, count: int, temperature: float, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of an overconfident model: the labels follow softmax(logits / temperature)."""
    logits = rng.normal(0, scale, (count, CLASSES))
    probabilities = softmax(logits / temperature, axis=1)
    labels = (probabilities.cumsum(axis=1) > rng.random((count, 1))).argmax(axis=1)
    return logits, labels


def test_temperature_scaling_finds_the_overconfidence_and_lowers_the_calibration_error():
    logits, labels = draw(np.random.default_rng(0), 4000, temperature=2.0)
    calibration = fit_temperature(logits, labels)
    assert calibration.temperature == pytest.approx(2.0, rel=0.15)
    assert calibration.ece_before > 0.05 and calibration.ece_after < calibration.ece_before / 2
    assert abs(calibration.confidence_gap) < 0.02 and calibration.validation_images == 4000
    with pytest.raises(ValueError, match="no"):
        fit_temperature(np.zeros((0, CLASSES)), np.zeros(0, int))


def test_estimates_on_batches_like_the_validation_split_are_close_and_their_intervals_cover():
    rng = np.random.default_rng(1)
    calibration = fit_temperature(*draw(rng, 4000, temperature=2.0))
    errors, covered = [], []
    for _ in range(200):
        logits, labels = draw(rng, 150, temperature=2.0)
        check = estimate_error(estimate_accuracy(logits, calibration), float((logits.argmax(axis=1) == labels).mean()))
        errors.append(check["error"])
        covered.append(check["covered"])
    assert np.mean(np.abs(errors)) < 0.03 and abs(np.mean(errors)) < 0.01
    assert np.mean(covered) >= 0.9  # nominal 95%


def test_the_uncalibrated_estimate_would_be_overconfident():
    """What the temperature is for: with T = 1 the same batches' accuracy is overestimated."""
    rng = np.random.default_rng(2)
    calibration = fit_temperature(*draw(rng, 4000, temperature=2.0))
    logits, labels = draw(rng, 2000, temperature=2.0)
    real = float((logits.argmax(axis=1) == labels).mean())
    raw = estimate_accuracy(logits, calibration.model_copy(update={"temperature": 1.0}))
    assert raw.accuracy - real > 0.05 and raw.low > real
    assert abs(estimate_accuracy(logits, calibration).accuracy - real) < 0.02


def estimated(batch: str, accuracy: float, low: float, high: float) -> dict:
    return report(batch) | {"estimated_accuracy": {"accuracy": accuracy, "low": low, "high": high, "images": 150, "level": 0.95}}


def test_the_policy_acts_on_an_estimated_drop_only_when_asked_and_only_before_labels():
    policy = RetrainingPolicy()
    fallen = estimated("b", 0.80, 0.74, 0.86)  # champion's test accuracy 0.98
    assert policy.estimated_accuracy_margin is None and not decide(card(), [fallen], policy).retrain
    acting = policy.model_copy(update={"estimated_accuracy_margin": 0.05})
    decision = decide(card(), [fallen], acting)
    assert decision.retrain and "estimated at 0.800" in decision.reasons[0]
    # The interval reaches the floor (0.93): not enough evidence.
    assert not decide(card(), [estimated("b", 0.90, 0.86, 0.94)], acting).retrain
    # Labels came: the real accuracy judges, not the estimate.
    assert not decide(card(), [fallen | {"champion_accuracy": 0.97, "labeled_rows": 150}], acting).retrain


def test_an_error_free_validation_split_does_not_claim_certainty():
    """Eighty validation images, all right: the likelihood alone would sharpen without end (the 1/20
    bound); the prior holds the temperature, and the interval keeps the split's own doubt."""
    rng = np.random.default_rng(3)
    logits, labels = draw(rng, 2000, temperature=1.0)
    right = np.flatnonzero(logits.argmax(axis=1) == labels)[:80]
    calibration = fit_temperature(logits[right], labels[right])
    unregularised = fit_temperature(logits[right], labels[right], prior_scale=1e6)
    assert unregularised.temperature < 0.06 and calibration.temperature > 0.1
    estimate = estimate_accuracy(logits[:100], calibration)
    assert estimate.high - estimate.low > 0.05
