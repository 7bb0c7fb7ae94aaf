"""Accuracy before labels: the served model's confidences, calibrated by temperature scaling on the
validation split (Guo et al., 2017), estimate its accuracy on a batch nobody has labeled yet —
confidence-based performance estimation, as NannyML's CBPE does for classifiers.

If the calibrated probability of each prediction is right, the number of right predictions on a batch
is a sum of independent Bernoulli draws with those probabilities: its mean is the sum of the
confidences, its variance the sum of p(1-p). The interval adds the calibration's own uncertainty (the
validation split it was fitted on is finite). The estimate assumes the batch looks like the data the
model was calibrated on: under covariate shift confidences stay high while accuracy falls, so the
drift report shows it beside the drift signals, never instead of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
from pydantic import BaseModel


class Calibration(BaseModel, frozen=True):
    """The served model's temperature and how well it calibrates the validation split (the model card's)."""

    temperature: float
    validation_images: int
    validation_accuracy: float
    # Mean calibrated confidence minus accuracy on the validation split: what is left of the bias.
    confidence_gap: float
    ece_before: float
    ece_after: float


@dataclass(frozen=True)
class AccuracyEstimate:
    accuracy: float
    low: float
    high: float
    images: int
    level: float

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return (f"{100 * self.accuracy:.1f}% ({100 * self.level:.0f}% interval {100 * self.low:.1f}–{100 * self.high:.1f}%) "
                f"on {self.images} images")


def fit_temperature(logits: np.ndarray, labels: np.ndarray, prior_scale: float = 1.0) -> Calibration:
    """The temperature of maximum posterior: the negative log-likelihood of `labels` under
    softmax(logits / T), summed, plus a normal prior on log T centred on 1 (`prior_scale`), searched on
    log T in [1/20, 20]; the fit's result on the same rows. The prior matters only when the validation
    split holds (almost) no errors: the likelihood alone then keeps rewarding sharper confidences and
    runs to the smallest temperature, claiming a certainty no finite split supports."""
    # Here, not at the top: the model card imports this module, and loading the definitions needs no scipy.
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax, softmax

    if len(labels) == 0:
        raise ValueError("temperature scaling needs labeled validation images, and there are none")
    logits = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def posterior(log_temperature: float) -> float:
        nll = -log_softmax(logits / np.exp(log_temperature), axis=1)[rows, labels].sum()
        return float(nll + 0.5 * (log_temperature / prior_scale) ** 2)

    temperature = float(np.exp(minimize_scalar(posterior, bounds=(-np.log(20), np.log(20)), method="bounded").x))
    before, after = softmax(logits, axis=1), softmax(logits / temperature, axis=1)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    return Calibration(
        temperature=temperature, validation_images=len(labels), validation_accuracy=accuracy,
        confidence_gap=float(after.max(axis=1).mean() - accuracy),
        ece_before=_ece(before, labels), ece_after=_ece(after, labels),
    )


def _ece(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Top-label ECE over 10 bins, as the evaluation's metrics compute it (torchmetrics)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(
        torch.from_numpy(probabilities).float(), torch.from_numpy(labels).long(), num_classes=probabilities.shape[1], n_bins=10,
    ))


def calibrate(predict: Callable[[np.ndarray], np.ndarray], batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Calibration:
    """`fit_temperature` on the logits `predict` gives for streamed `(images, labels)` batches: only the
    logits are kept, never the images."""
    logits, labels = [], []
    for images, batch_labels in batches:
        logits.append(predict(images))
        labels.append(batch_labels)
    return fit_temperature(np.concatenate(logits), np.concatenate(labels))


def estimate_accuracy(logits: np.ndarray, calibration: Calibration, level: float = 0.95) -> AccuracyEstimate:
    """The expected accuracy of the predictions behind `logits` and a `level` interval for the accuracy
    they will turn out to have once labeled."""
    from scipy.special import softmax
    from scipy.stats import norm

    if len(logits) == 0:
        raise ValueError("an accuracy estimate needs at least one image")
    confidence = softmax(logits.astype(np.float64) / calibration.temperature, axis=1).max(axis=1)
    estimate = float(confidence.mean())
    sampling = np.sqrt(np.sum(confidence * (1 - confidence))) / len(confidence)
    # The validation accuracy the temperature was fitted to is itself a draw of validation_images; its
    # spread by Agresti-Coull (two errors and two successes added), so an error-free split of a hundred
    # images still leaves a few points of doubt.
    images = calibration.validation_images + 4
    adjusted = (calibration.validation_accuracy * calibration.validation_images + 2) / images
    fitted = np.sqrt(adjusted * (1 - adjusted) / images)
    # Half an image either way: the realised accuracy moves in steps of 1/n (continuity correction).
    spread = norm.ppf(0.5 + level / 2) * np.hypot(sampling, fitted) + 0.5 / len(confidence)
    return AccuracyEstimate(estimate, max(0.0, estimate - spread), min(1.0, estimate + spread), len(confidence), level)


def estimate_error(estimate: AccuracyEstimate, real_accuracy: float) -> dict:
    """An estimate made before labels against the accuracy the labels showed on the same images."""
    return {
        "estimated": estimate.accuracy, "low": estimate.low, "high": estimate.high, "real": real_accuracy,
        "error": estimate.accuracy - real_accuracy, "covered": bool(estimate.low <= real_accuracy <= estimate.high),
        "images": estimate.images,
    }
