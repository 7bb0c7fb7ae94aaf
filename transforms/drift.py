"""Drift statistics, with Evidently's defaults: per feature, the two-sample Kolmogorov-Smirnov test
(drift when p < 0.05) for references up to 1,000 rows, and the Wasserstein distance normalised by
the reference's standard deviation (drift when >= 0.1) for larger ones; the dataset drifted when
at least half of the features did."""

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
    share = sum(r.drifted for r in results) / len(results)
    return DriftResult(results, share, share >= policy.dataset_drift_share, reference.height, current.height)
