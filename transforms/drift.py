"""Drift statistics, with Evidently's defaults: per feature, the two-sample Kolmogorov-Smirnov test
(drift when p < 0.05) for references up to 1,000 rows, and the Wasserstein distance normalised by
the reference's standard deviation (drift when >= 0.1) for larger ones; the dataset drifted when
at least half of the features did. A feature that holds one and the same value in the reference and
the batch (the colour of grayscale scans, the size of images that all come at one size) carries no
evidence either way and is left out of that share."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from scipy.stats import ks_2samp, wasserstein_distance


@dataclass(frozen=True)
class DriftPolicy:
    ks_p_value: float = 0.05
    distance_threshold: float = 0.1
    small_reference: int = 1000
    dataset_drift_share: float = 0.5


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    method: str
    statistic: float
    threshold: float
    drifted: bool
    reference_mean: float
    current_mean: float


@dataclass(frozen=True)
class DriftResult:
    features: list[FeatureDrift]
    drifted_share: float
    dataset_drift: bool
    reference_rows: int
    current_rows: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> pl.DataFrame:
        return pl.DataFrame([asdict(f) for f in self.features])


def feature_drift(name: str, reference: np.ndarray, current: np.ndarray, policy: DriftPolicy) -> FeatureDrift:
    if _constant(reference, current):
        return FeatureDrift(name, "constant", 0.0, 0.0, False, float(reference[0]), float(current[0]))
    if len(reference) <= policy.small_reference:
        p_value = float(ks_2samp(reference, current).pvalue)
        method, statistic, threshold, drifted = "ks_p_value", p_value, policy.ks_p_value, p_value < policy.ks_p_value
    else:
        scale = float(np.std(reference)) or 1.0
        distance = float(wasserstein_distance(reference, current)) / scale
        method, statistic, threshold = "wasserstein_normed", distance, policy.distance_threshold
        drifted = distance >= policy.distance_threshold
    return FeatureDrift(
        name, method, statistic, threshold, bool(drifted), float(np.mean(reference)), float(np.mean(current))
    )


def _constant(reference: np.ndarray, current: np.ndarray) -> bool:
    """One value on both sides, up to float rounding (statistics computed in float32)."""
    low, high = min(reference.min(), current.min()), max(reference.max(), current.max())
    return bool(high - low <= 1e-6 * max(1.0, abs(high)))


def dataset_drift(
    reference: pl.DataFrame, current: pl.DataFrame, features: list[str], policy: DriftPolicy
) -> DriftResult:
    if reference.is_empty() or current.is_empty():
        raise ValueError(
            f"drift needs rows on both sides: reference has {reference.height}, current has {current.height}"
        )
    results = [
        feature_drift(name, reference[name].to_numpy(), current[name].to_numpy(), policy) for name in features
    ]
    informative = [r for r in results if r.method != "constant"]
    share = sum(r.drifted for r in informative) / len(informative) if informative else 0.0
    return DriftResult(results, share, share >= policy.dataset_drift_share, reference.height, current.height)


@dataclass(frozen=True)
class EmbeddingDrift:
    """Maximum mean discrepancy between two sets of embeddings, with a permutation test."""

    mmd2: float
    p_value: float
    threshold: float
    drifted: bool
    reference_rows: int
    current_rows: int


def embedding_drift(
    reference: np.ndarray, current: np.ndarray, p_value_threshold: float = 0.01,
    max_rows: int = 400, permutations: int = 200, seed: int = 0,
) -> EmbeddingDrift:
    """MMD² with an RBF kernel (median-distance bandwidth), p-value by scipy's permutation test.

    At most `max_rows` rows per side are sampled: the test's power saturates long before, and its
    cost grows with the square of the rows. The kernel matrix is computed once; permutations only
    reweight it."""
    from scipy.spatial.distance import cdist
    from scipy.stats import permutation_test

    rng = np.random.default_rng(seed)
    if len(reference) > max_rows:
        reference = reference[rng.choice(len(reference), max_rows, replace=False)]
    if len(current) > max_rows:
        current = current[rng.choice(len(current), max_rows, replace=False)]
    pooled = np.concatenate([reference, current]).astype(np.float64)
    distances = cdist(pooled, pooled, "sqeuclidean")
    bandwidth = np.median(distances[distances > 0]) if (distances > 0).any() else 1.0
    kernel = np.exp(-distances / bandwidth)

    def mmd2(x_index: np.ndarray, y_index: np.ndarray, axis: int = -1) -> np.ndarray:
        # Biased MMD² of a split = w' K w, with w = 1/n on one side and -1/m on the other: one matrix
        # product scores a whole batch of permutations.
        x_index, y_index = np.atleast_2d(x_index), np.atleast_2d(y_index)
        weights = np.zeros((len(x_index), len(pooled)))
        rows = np.arange(len(x_index))[:, None]
        weights[rows, x_index] = 1.0 / x_index.shape[1]
        weights[rows, y_index] = -1.0 / y_index.shape[1]
        return ((weights @ kernel) * weights).sum(axis=1)

    result = permutation_test(
        (np.arange(len(reference)), np.arange(len(reference), len(pooled))), mmd2,
        permutation_type="independent", vectorized=True, n_resamples=permutations, alternative="greater", random_state=seed,
    )
    p_value = float(np.squeeze(result.pvalue))
    return EmbeddingDrift(float(np.squeeze(result.statistic)), p_value, p_value_threshold, p_value < p_value_threshold, len(reference), len(current))


@dataclass(frozen=True)
class PredictionDrift:
    """Shift of the predicted-class distribution (Evidently's categorical defaults: chi-square
    p < 0.05 up to 1,000 reference rows, Jensen-Shannon distance >= 0.1 beyond)."""

    method: str
    statistic: float
    threshold: float
    drifted: bool
    reference_share: list[float]
    current_share: list[float]


def prediction_drift(reference: np.ndarray, current: np.ndarray, num_classes: int, policy: DriftPolicy) -> PredictionDrift:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import chi2_contingency

    counts = np.stack([np.bincount(reference, minlength=num_classes), np.bincount(current, minlength=num_classes)])
    shares = counts / counts.sum(axis=1, keepdims=True)
    if len(reference) <= policy.small_reference:
        present = counts.sum(axis=0) > 0  # chi-square needs no empty columns
        p_value = float(chi2_contingency(counts[:, present]).pvalue) if present.sum() > 1 else 1.0
        method, statistic, threshold, drifted = "chi2_p_value", p_value, policy.ks_p_value, p_value < policy.ks_p_value
    else:
        distance = float(jensenshannon(shares[0], shares[1], base=2))
        method, statistic, threshold = "jensen_shannon", distance, policy.distance_threshold
        drifted = distance >= policy.distance_threshold
    return PredictionDrift(method, statistic, threshold, bool(drifted), shares[0].round(4).tolist(), shares[1].round(4).tolist())
