"""Incremental retraining: which rows it trains on, when the policy chooses it, when the training
falls back to a full one, and that the trainer reads only the chosen rows."""

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl

from orchestration.policy import RetrainingPolicy, training_mode
from tests.conftest import model_card
from training.replay import replay_selection

POLICY = RetrainingPolicy()


def write_index(path: Path, batches: dict[str, list[int]]) -> Path:
    """A split's index, row for row: batch -> the label of each of its rows, in file order."""
    rows = [{"image_id": f"{batch}-{i}", "batch_id": batch, "label": label} for batch, labels in batches.items() for i, label in enumerate(labels)]
    pl.DataFrame(rows).write_parquet(path)
    return path


def test_replay_takes_every_new_row_and_a_class_balanced_sample_of_the_history(tmp_path: Path):
    # History: class 0 common (300 rows), class 1 rare (10), class 2 (90); the new batch has 60 rows.
    history = [0] * 300 + [1] * 10 + [2] * 90
    index = write_index(tmp_path / "train.index.parquet", {"old": history, "new": [0, 1, 2] * 20})
    new_rows = set(range(400, 460))

    selection = replay_selection(index, ["new"], replay_ratio=1.5, seed=0)
    chosen = set(selection.indices.tolist())
    assert new_rows <= chosen and selection.new_examples == 60
    assert selection.replay_examples == 90 == len(chosen - new_rows) and selection.history_examples == 400
    # The rare class is replayed whole; the other two share the rest equally.
    assert selection.replay_per_class == {0: 40, 1: 10, 2: 40}
    replayed = np.array(sorted(chosen - new_rows))
    assert np.bincount(np.array(history)[replayed], minlength=3).tolist() == [40, 10, 40]
    assert np.all(np.diff(selection.indices.astype(np.int64)) > 0)

    again = replay_selection(index, ["new"], replay_ratio=1.5, seed=0)
    assert np.array_equal(again.indices, selection.indices)
    assert not np.array_equal(replay_selection(index, ["new"], replay_ratio=1.5, seed=1).indices, selection.indices)
    assert replay_selection(index, ["new"], replay_ratio=100, seed=0).replay_examples == 400  # all of a smaller history
    assert set(replay_selection(index, ["new"], replay_ratio=0, seed=0).indices.tolist()) == new_rows
    # Each new row twice per epoch; the replay sample is sized by the new rows, not by their passes.
    twice = replay_selection(index, ["new"], replay_ratio=1.5, seed=0, new_passes=2)
    assert twice.new_passes == 2 and twice.replay_examples == 90 and len(twice.indices) == 2 * 60 + 90
    assert np.array_equal(np.unique(twice.indices), selection.indices)
    assert (np.bincount(twice.indices.astype(np.int64))[sorted(new_rows)] == 2).all()


def test_the_policy_fine_tunes_only_a_champion_of_this_code_and_not_on_schedule():
    champion = model_card().model_copy(update={"version": "v0003"})  # its code version is "test"
    mode, why = training_mode(champion, POLICY, code="test", scheduled=False)
    assert mode == "incremental" and "v0003" in why
    assert training_mode(champion, POLICY, code="test", scheduled=True) == ("full", "the schedule retrains on all labeled data from scratch")
    assert training_mode(champion, POLICY, code="newer", scheduled=False)[1] == "the code changed since the champion v0003 was trained"
    assert training_mode(None, POLICY, code="test", scheduled=False)[0] == "full"
    off = POLICY.model_copy(update={"incremental": False})
    assert training_mode(champion, off, code="test", scheduled=False) == ("full", "retraining.incremental is off")


def test_an_incremental_training_falls_back_to_full_when_the_champion_cannot_be_fine_tuned(tmp_path: Path):
    from orchestration.assets.training import TrainingConfig, training_plan
    from training.registry import ModelVersion

    (tmp_path / "card.json").write_text(model_card(training_batches=("a", "b")).model_dump_json())
    champion = ModelVersion("v0001", tmp_path)
    index = write_index(tmp_path / "train.index.parquet", {"a": [0, 1] * 50, "b": [1, 2] * 50, "c": [0, 1, 2] * 10})
    datasets = {"splits": {"train": {"index": str(index), "batches": ["a", "b", "c"], "examples": 230}}}
    config = TrainingConfig(mode="incremental", replay_ratio=2.0)

    def plan(config: TrainingConfig, champion=champion, datasets=datasets):
        return training_plan(config, champion, config.model(10, 8, tmp_path), datasets)

    incremental = plan(config)
    assert incremental.mode == "incremental" and incremental.selection.new_examples == 30
    assert incremental.selection.replay_examples == 60 and "v0001" in incremental.reason and "c" in incremental.reason
    assert plan(config.model_copy(update={"mode": "full"})).reason == "a full retraining was asked for"
    assert plan(config, champion=None).reason == "there is no champion to fine-tune"
    assert plan(TrainingConfig(mode="incremental", width=16)).reason == "this network differs from the champion v0001's in width"
    assert "every batch" in plan(config, datasets={"splits": {"train": {**datasets["splits"]["train"], "batches": ["a", "b"]}}}).reason
    grown = training_plan(config, champion, config.model(11, 8, tmp_path), datasets)
    assert grown.mode == "full" and "num_classes" in grown.reason
    # A young history: 30 new rows twice and 60 replayed, 120 per epoch x 10 epochs, are cheaper than all
    # 230 x 16 epochs; with the incremental epochs as many as the full ones, and three new rows per old one,
    # fine-tuning would train more than the full retraining, which is chosen.
    assert incremental.selection.indices.size * 10 < 230 * 16
    equal_epochs = config.model_copy(update={"epochs": 10, "incremental_epochs": 10})
    assert plan(equal_epochs).mode == "incremental"  # 1,200 against 2,300
    young = {"splits": {"train": {"index": str(write_index(tmp_path / "young.index.parquet", {"a": [0, 1] * 20, "c": [0, 1, 2] * 30})),
                                  "batches": ["a", "c"], "examples": 130}}}
    (tmp_path / "young").mkdir()
    (tmp_path / "young" / "card.json").write_text(model_card(training_batches=("a",)).model_dump_json())
    costly = plan(equal_epochs, champion=ModelVersion("v0001", tmp_path / "young"), datasets=young)
    assert costly.mode == "full" and costly.selection is None, costly.reason
    assert "would train 2,200 examples (220 per epoch x 10: the new batches' 90 x2 and 40 replayed) against a full " \
        "retraining's 1,300 (130 x 10)" in costly.reason


def test_the_trainer_reads_only_the_rows_an_incremental_retraining_chose(digits_splits: dict, tmp_path: Path):
    from training.config import FitConfig, OptimConfig
    from training.fit import fit

    rows = np.r_[0:100, 300:350].astype(np.uint64)
    np.save(tmp_path / "rows.npy", rows)
    fit(FitConfig(
        beton_dir=digits_splits["dir"], run_dir=tmp_path / "run", wandb_save_dir=tmp_path, audit_examples=True,
        optim=OptimConfig(epochs=1, batch_size=32), train_indices=tmp_path / "rows.npy",
    ))
    seen = json.loads((tmp_path / "run" / "audit" / "rank0.json").read_text())
    images = digits_splits["images"]["train"]
    chosen = {hashlib.sha1(images[row].tobytes()).hexdigest() for row in rows}
    assert len(seen) == 128  # 150 rows in full batches of 32
    assert set(seen) <= chosen


def test_distillation_pulls_toward_the_champion_only_where_it_was_right(tmp_path: Path):
    import pytest
    import torch
    import torch.nn.functional as F
    from pydantic import ValidationError

    from training.backbones import build_network
    from training.config import FitConfig, ModelConfig, OptimConfig
    from training.fit import distillation_teacher
    from training.model import LitClassifier

    config = ModelConfig(width=8, resolution=8)
    optim = OptimConfig(distillation=1.0, distillation_temperature=2.0)
    teacher = build_network(config)
    student = LitClassifier(config.model_dump(mode="json"), optim.model_dump(), teacher=teacher)
    assert "teacher" not in dict(student.named_modules()) and not any(k.startswith("teacher") for k in student.state_dict())
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    teacher_logits = teacher(images)
    right = teacher_logits.argmax(dim=1)
    labels = torch.cat([right[:3], (right[3:] + 1) % 10])  # the teacher is right on the first three only

    # The champion itself has nothing to learn from itself.
    student.net.load_state_dict(teacher.state_dict())
    student.net.eval()
    assert student.distillation_loss(images, labels, student(images)).item() == pytest.approx(0.0, abs=1e-6)
    # Elsewhere: Hinton's T^2-scaled KL on the rows the teacher got right, averaged over the batch.
    logits = torch.randn(6, 10)
    expected = sum(
        F.kl_div(F.log_softmax(logits[row] / 2, dim=0), F.softmax(teacher_logits[row] / 2, dim=0), reduction="sum") for row in range(3)
    ) * 4 / 6
    assert student.distillation_loss(images, labels, logits).item() == pytest.approx(expected.item(), rel=1e-4)
    assert student.distillation_loss(images, (right + 1) % 10, logits).item() == 0.0

    # It distils the warm start: none, or one whose head does not fit these classes, is no teacher.
    with pytest.raises(ValidationError, match="needs warm_start"):
        FitConfig(beton_dir=tmp_path, run_dir=tmp_path, wandb_save_dir=tmp_path, optim=optim)
    messages = []
    fit_config = FitConfig(beton_dir=tmp_path, run_dir=tmp_path, wandb_save_dir=tmp_path, optim=optim, model=config, warm_start=tmp_path / "w")
    assert distillation_teacher(fit_config, teacher.state_dict(), messages.append) is not None
    grown = fit_config.model_copy(update={"model": config.model_copy(update={"num_classes": 11})})
    assert distillation_teacher(grown, teacher.state_dict(), messages.append) is None
    assert messages and messages[0].startswith("no distillation: head.") and "do not fit this network" in messages[0]
