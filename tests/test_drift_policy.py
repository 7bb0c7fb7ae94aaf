import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

from orchestration.policy import RetrainingPolicy, decide
from tests.conftest import model_card
from training.card import ModelCard
from transforms.drift import DriftPolicy, dataset_drift, feature_drift


def frame(rng: np.random.Generator, n: int, shift: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame({"a": rng.normal(shift, 1, n), "b": rng.normal(shift, 1, n), "c": rng.normal(0, 1, n)})


def test_same_distribution_is_not_drift_and_a_shift_is():
    rng = np.random.default_rng(0)
    reference = frame(rng, 500)
    assert not dataset_drift(reference, frame(rng, 300), ["a", "b", "c"], DriftPolicy()).dataset_drift
    shifted = dataset_drift(reference, frame(rng, 300, shift=1.0), ["a", "b", "c"], DriftPolicy())
    assert shifted.dataset_drift and shifted.drifted_share == 2 / 3
    assert [f.method for f in shifted.features] == ["ks_p_value"] * 3


def test_large_references_use_normalised_wasserstein():
    rng = np.random.default_rng(1)
    result = feature_drift("x", rng.normal(0, 1, 5000), rng.normal(0.5, 1, 800), DriftPolicy())
    assert result.method == "wasserstein_normed" and result.drifted
    assert 0.4 < result.statistic < 0.6


POLICY = RetrainingPolicy()


def card(version: str = "v0001", batches=("a",), accuracy: float = 0.98) -> ModelCard:
    return model_card(training_batches=batches, test_accuracy=accuracy).model_copy(update={"version": version})


def report(batch: str, drift: bool = False, accuracy: float | None = None, champion: str = "v0001", labeled: int = 200) -> dict:
    return {
        "batch_id": batch, "champion": champion, "drifted": drift, "drifted_share": 0.6 if drift else 0.0,
        "embedding": {"p_value": 0.001 if drift else 0.5}, "champion_accuracy": accuracy,
        "labeled_rows": labeled if accuracy is not None else 0,
    }


def test_policy_retrains_without_a_champion_on_drift_and_on_an_accuracy_drop():
    assert decide(None, [], POLICY).retrain
    assert not decide(card(), [report("b")], POLICY).retrain
    assert decide(card(), [report("b", drift=True)], POLICY).retrain
    assert decide(card(), [report("b", accuracy=0.80)], POLICY).retrain
    assert not decide(card(), [report("b", accuracy=0.95)], POLICY).retrain
    assert decide(card(), [], POLICY, schedule_due=True).retrain


def test_an_accuracy_drop_must_be_significant_for_the_batch_and_test_split_sizes():
    """0.98 on 100 test images; a batch at 0.88 is 5 points past the margin: chance on 40 labeled images, not on 1,000."""
    small, large = report("b", accuracy=0.875, labeled=40), report("b", accuracy=0.88, labeled=1000)
    assert not decide(card(), [small], POLICY).retrain
    decision = decide(card(), [large], POLICY)
    assert decision.retrain and "(1000 images)" in decision.reasons[0] and "(100 images)" in decision.reasons[0]
    # A stricter level asks for more evidence; an accuracy of 1 on the test split is handled (no division by zero).
    assert not decide(card(), [large], POLICY.model_copy(update={"accuracy_significance": 1e-6})).retrain
    assert decide(card(accuracy=1.0), [report("b", accuracy=0.5, labeled=30)], POLICY).retrain


def test_policy_ignores_batches_the_champion_trained_on_and_reports_on_other_champions():
    assert not decide(card(batches=("a", "b")), [report("b", drift=True)], POLICY).retrain
    assert not decide(card(), [report("b", drift=True, champion="v0000")], POLICY).retrain


def test_the_retraining_policy_and_schedule_come_from_flywheel_yaml(tmp_path: Path):
    """The schedule's cron is read when the code location loads; the policy at each use."""
    (tmp_path / "flywheel.yaml").write_text("retraining:\n  schedule: '30 2 * * *'\n  accuracy_margin: 0.2\n")
    shown = subprocess.run(
        [sys.executable, "-c", "from orchestration.definitions import defs, flywheel; "
         "print(defs.resolve_schedule_def('retraining_schedule').cron_schedule, flywheel.project.retraining.accuracy_margin)"],
        env={**os.environ, "FLYWHEEL_HOME": str(tmp_path)}, capture_output=True, text=True, check=True,
    )
    assert shown.stdout.strip() == "30 2 * * * 0.2"
    (tmp_path / "flywheel.yaml").unlink()
    shown = subprocess.run(
        [sys.executable, "-c", "from orchestration.definitions import defs; print(defs.resolve_schedule_def('retraining_schedule').cron_schedule)"],
        env={**os.environ, "FLYWHEEL_HOME": str(tmp_path)}, capture_output=True, text=True, check=True,
    )
    assert shown.stdout.strip() == RetrainingPolicy().schedule == "0 3 * * 1"


def test_a_feature_constant_on_both_sides_is_left_out_of_the_share_and_one_that_stops_being_constant_drifts():
    rng = np.random.default_rng(2)
    reference = frame(rng, 500).with_columns(pl.lit(0.0).alias("colour"))
    shifted = frame(rng, 300, shift=1.0).with_columns(pl.lit(0.0).alias("colour"))
    result = dataset_drift(reference, shifted, ["a", "b", "c", "colour"], DriftPolicy())
    assert [f.method for f in result.features][-1] == "constant"
    assert result.drifted_share == 2 / 3 and result.dataset_drift
    colour_appears = frame(rng, 300).with_columns(pl.Series("colour", rng.uniform(0, 0.3, 300)))
    result = dataset_drift(reference, colour_appears, ["a", "b", "c", "colour"], DriftPolicy())
    assert result.features[-1].drifted and result.features[-1].method == "ks_p_value"


def test_the_sample_grid_shows_the_batch_beside_the_reference(tmp_path: Path):
    from PIL import Image

    from orchestration.metadata import sample_grid_png

    red, blue = np.zeros((20, 16, 16, 3), np.uint8), np.zeros((5, 16, 16, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    path = sample_grid_png(red, blue, tmp_path / "grid.png", "b-000", "champion v0001's training images")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    left, right = pixels[:, : pixels.shape[1] // 2], pixels[:, pixels.shape[1] // 2 :]

    def count(half: np.ndarray, colour: tuple[int, int, int]) -> int:
        return int((np.abs(half - np.array(colour)).sum(axis=2) < 60).sum())

    # The batch (red) on the left, the reference (blue) on the right; 16 batch images at most.
    assert count(left, (255, 0, 0)) > 16 * 16 * 16 * 0.5 and count(left, (0, 0, 255)) == 0
    assert count(right, (0, 0, 255)) > 5 * 16 * 16 * 0.5 and count(right, (255, 0, 0)) == 0
