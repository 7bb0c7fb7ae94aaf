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
