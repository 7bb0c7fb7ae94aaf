"""The promotion gate on paired predictions of real models: a clearly better candidate is promoted
despite noise on small slices; a candidate that forgets a class or a batch is blocked with the
slice named. The statistics are scipy's and statsmodels', never replaced by fixed margins."""

from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.assets.evaluation import GateConfig
from training.config import FitConfig, ModelConfig, OptimConfig
from training.data import write_beton
from training import evaluate
from training.evaluate import evaluate_candidate
from training.fit import fit
from training.gate import ModelAnswers, promotion_decision
from training.inference import load_classifier, predict_torch

POLICY = GateConfig().policy()  # the defaults users get
CLEAN_SLICES = 4  # the clean test images as 4 batches of 25, the size of an old batch's test slice


@pytest.fixture(scope="module")
def mixed_weights(digits_splits: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier trained on clean and inverted digits: it knows a domain the clean-only one does not."""
    folder = tmp_path_factory.mktemp("mixed")
    for split in ("train", "val"):
        images, labels = digits_splits["images"][split], digits_splits["labels"][split]
        write_beton(folder / f"{split}.beton", np.concatenate([images, 255 - images]), np.concatenate([labels, labels]))
    root = tmp_path_factory.mktemp("fit-mixed")
    result = fit(FitConfig(
        beton_dir=folder, run_dir=root / "run", wandb_save_dir=root,
        model=ModelConfig(width=32), optim=OptimConfig(epochs=6, batch_size=32, reference_batch=32),
    ))
    return Path(result.weights_path)


@pytest.fixture(scope="module")
def test_set(digits_splits: dict) -> evaluate.TestSet:
    """100 clean test images in 4 batches of 25, and the same digits inverted as a new batch."""
    images, labels = digits_splits["images"]["test"], digits_splits["labels"]["test"]
    batches = np.array([f"clean-{i % CLEAN_SLICES}" for i in range(len(labels))] + ["inverted"] * len(labels))
    return evaluate.TestSet.of_arrays(np.concatenate([images, 255 - images]), np.concatenate([labels, labels]), batches)


def logits_of(weights: Path, test: evaluate.TestSet, forget_class: int | None = None) -> np.ndarray:
    network = load_classifier(weights, ModelConfig(width=32))
    if forget_class is not None:  # the same network, whose head can no longer answer one class
        with torch.no_grad():
            network.head.bias[forget_class] = -1e4
    (logits,) = test.logits(lambda images: predict_torch(network, images))
    return logits


def two_fewer_right_per_clean_slice(candidate: np.ndarray, champion: np.ndarray, test: evaluate.TestSet) -> np.ndarray:
    """The candidate's logits, made to answer as the champion does on each clean slice except for two
    images the champion gets right: exactly two fewer right there, whatever the two models learned."""
    logits = candidate.copy()
    labels = test.labels
    for index in range(CLEAN_SLICES):
        clean = test.slices == f"clean-{index}"
        logits[clean] = champion[clean]
        both_right = np.flatnonzero(clean & (logits.argmax(1) == labels))
        for row in both_right[:2]:
            logits[row] = 0.0
            logits[row, (labels[row] + 1) % 10] = 10.0
    return logits


def test_a_clearly_better_candidate_is_promoted_despite_two_fewer_right_on_small_slices(
    trained_weights: Path, mixed_weights: Path, test_set: evaluate.TestSet
):
    champion = logits_of(trained_weights, test_set)  # never saw inverted digits
    candidate = two_fewer_right_per_clean_slice(logits_of(mixed_weights, test_set), champion, test_set)
    evaluation = evaluate_candidate(candidate, champion, test_set, 10, POLICY, "fp32")
    decision = evaluation.gate

    assert evaluation.candidate.accuracy > evaluation.champion.accuracy + 0.2, (evaluation.candidate.accuracy, evaluation.champion.accuracy)
    for index in range(CLEAN_SLICES):
        clean = next(s for s in decision.slices if s.slice == f"batch clean-{index}")
        assert clean.champion_correct - clean.candidate_correct >= 2 and not clean.regressed
    assert decision.passed, decision.reasons
    assert decision.overall.not_inferior and decision.overall.ci95_low > 0
    assert any("batch clean-0" in r and "noise, not a regression" in r for r in decision.reasons), decision.reasons


def test_a_candidate_that_forgets_a_class_is_blocked_with_the_class_named(mixed_weights: Path, test_set: evaluate.TestSet):
    champion = logits_of(mixed_weights, test_set)
    candidate = logits_of(mixed_weights, test_set, forget_class=3)
    decision = evaluate_candidate(candidate, champion, test_set, 10, POLICY, "fp32").gate

    assert not decision.passed, decision.reasons
    assert [s.slice for s in decision.slices if s.regressed] == ["class 3"], decision.reasons
    assert any(r.startswith("class 3:") and "significant regression: blocked" in r for r in decision.reasons), decision.reasons


def test_a_candidate_that_forgets_a_batch_is_blocked_with_the_batch_named(
    trained_weights: Path, mixed_weights: Path, test_set: evaluate.TestSet
):
    champion = logits_of(mixed_weights, test_set)  # knows the inverted batch
    candidate = logits_of(trained_weights, test_set)  # does not
    decision = evaluate_candidate(candidate, champion, test_set, 10, POLICY, "fp32").gate

    assert not decision.passed
    assert "batch inverted" in [s.slice for s in decision.slices if s.regressed]
    assert any(r.startswith("batch inverted:") and "blocked" in r for r in decision.reasons), decision.reasons


def test_identical_answers_pass_and_a_first_model_needs_the_floor():
    labels = np.arange(40) % 4
    batches = np.array(["a"] * 40)
    same = ModelAnswers(labels.copy(), ece=0.05)
    decision = promotion_decision(labels, batches, same, same, POLICY, "int8")
    assert decision.passed and decision.overall.difference == 0 and not any(s.regressed for s in decision.slices)
    assert promotion_decision(labels, batches, same, None, POLICY, "int8").passed
    wrong = ModelAnswers((labels + 1) % 4, ece=0.05)
    first = promotion_decision(labels, batches, wrong, None, POLICY, "int8")
    assert not first.passed and "floor" in first.reasons[0]


def test_worse_calibration_beyond_the_bound_blocks():
    labels = np.arange(40) % 4
    batches = np.array(["a"] * 40)
    decision = promotion_decision(labels, batches, ModelAnswers(labels, ece=0.20), ModelAnswers(labels, ece=0.05), POLICY, "fp32")
    assert not decision.passed and any("calibration" in r and "worse beyond" in r for r in decision.reasons)


def test_small_slices_are_reported_not_tested():
    labels = np.arange(12) % 3
    batches = np.array(["big"] * 10 + ["tiny"] * 2)
    champion = ModelAnswers(labels, ece=0.0)
    candidate_predictions = labels.copy()
    candidate_predictions[10:] = (labels[10:] + 1) % 3  # both tiny-slice images wrong
    decision = promotion_decision(labels, batches, ModelAnswers(candidate_predictions, ece=0.0), champion, POLICY, "fp32")
    tiny = next(s for s in decision.slices if s.slice == "batch tiny")
    assert tiny.p_holm is None and not tiny.regressed
    assert any("batch tiny" in r and "too few images to judge" in r for r in decision.reasons)


def test_a_champion_from_before_a_class_was_added_is_compared_on_the_shared_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    test = evaluate.TestSet.of_arrays(np.zeros((120, 8, 8, 3), np.uint8), labels, np.array(["b"] * 120))
    candidate = np.eye(3)[labels] * 5.0  # right everywhere
    champion = np.eye(3)[labels][:, :2] * 5.0 + rng.normal(0, 0.1, (120, 2))  # two outputs: never says class 2

    result = evaluate_candidate(candidate, champion, test, 3, POLICY, "fp32")

    assert result.champion.per_class[2]["recall"] == 0.0 and result.champion.per_class[0]["recall"] == 1.0
    assert result.gate.passed, result.gate.reasons
    shared = {s.slice: s for s in result.gate.slices}
    assert shared["class 0"].champion_correct == shared["class 0"].candidate_correct == 40
    assert shared["class 2"].champion_correct == 0 and shared["class 2"].candidate_correct == 40
