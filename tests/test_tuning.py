"""The `tune` job: Optuna trials of the real training (Lightning on FFCV files), pruned, logged to W&B,
resumable from their journal, and the best values taken by the next `trained_model`."""

import json
from pathlib import Path

import dagster as dg
import optuna
import pytest

from tests.conftest import FAST_TRAINING, resources_for, stored_datasets
from training.config import FitConfig, ModelConfig, OptimConfig, TuneConfig
from training.tracking import find_offline_run, read_offline_run


class PruneAfterTheFirstTrial(optuna.pruners.BasePruner):
    """Deterministic stand-in for the median rule: every trial after the first stops at its first epoch."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number > 0


def test_trials_are_pruned_logged_and_resumed_and_the_baseline_is_trial_zero(digits_splits: dict, tmp_path: Path):
    from training.tune import tune

    base = FitConfig(
        beton_dir=digits_splits["dir"], run_dir=tmp_path / "study", wandb_save_dir=tmp_path,
        model=ModelConfig(width=16), optim=OptimConfig(epochs=3, batch_size=64, learning_rate=2e-3),
    )
    config = TuneConfig(base=base, study_name="study-a", storage=tmp_path / "study-a.journal", trials=3)
    lines: list[str] = []
    result = tune(config, log=lines.append, pruner=PruneAfterTheFirstTrial())

    assert [row["state"] for row in result.trials] == ["complete", "pruned", "pruned"]
    assert [row["epochs"] for row in result.trials] == [3, 1, 1]
    # Trial 0 is the configured training, so the search is measured against the defaults.
    assert result.best.trial == 0
    assert result.best.values == {"learning_rate": 2e-3, "weight_decay": 5e-4, "label_smoothing": 0.0}
    assert result.trials[1]["learning_rate"] != 2e-3  # the others are sampled
    assert any(line.startswith("trial 1 pruned after 1 epochs (learning_rate") for line in lines), lines

    pruned_run = read_offline_run(find_offline_run(tmp_path / "wandb", result.trials[1]["wandb_run"]))
    assert pruned_run.summary["optuna/state"] == "pruned"
    assert pruned_run.group == "study-a"  # a study's trials are one W&B group
    assert pruned_run.config["optim"]["learning_rate"] == pytest.approx(result.trials[1]["learning_rate"], rel=1e-3)
    assert not list((tmp_path / "study").glob("trial-*/checkpoints"))  # only configurations are kept

    # The journal resumes the study: a second run adds trials to it instead of starting over.
    again = tune(config.model_copy(update={"trials": 1}), log=lines.append, pruner=PruneAfterTheFirstTrial())
    assert (again.added, len(again.trials), again.best.trial) == (1, 4, 0)
    assert again.trials[3]["learning_rate"] not in {row["learning_rate"] for row in again.trials[:3]}  # not a redraw


def test_a_killed_tune_leaves_no_trial_running_and_its_baseline_runs_again(tmp_path: Path):
    """The journal of a tune killed during its first trial (the baseline): that trial is failed, the
    baseline queued again; a study whose baseline finished gets no second one."""
    from training.tune import open_study, prepare, sample

    config = TuneConfig(
        base=FitConfig(beton_dir=tmp_path, run_dir=tmp_path, wandb_save_dir=tmp_path), study_name="killed", storage=tmp_path / "killed.journal",
    )
    baseline = {"learning_rate": 3e-3, "weight_decay": 5e-4, "label_smoothing": 0.0}
    study = open_study(config)
    study.enqueue_trial(baseline)
    killed = study.ask()
    assert sample(killed, config.space, list(baseline)) == baseline  # the process died here, during its trial

    lines: list[str] = []
    prepare(open_study(config), baseline, lines.append)
    trials = open_study(config).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert lines == ["trial 0 was left running by a tune that stopped (killed?): marked failed"]

    resumed = open_study(config)
    resumed.tell(resumed.ask(), 0.5)  # the queued baseline runs and finishes
    prepare(open_study(config), baseline, lines.append)
    assert len(open_study(config).trials) == 2 and len(lines) == 1


def test_the_tune_job_finds_values_that_the_next_trained_model_uses(digits_splits: dict, home: Path):
    from orchestration.assets.datasets import ffcv_datasets
    from orchestration.assets.training import trained_model, tuned_hyperparameters
    from orchestration.resources import FlywheelHome

    datasets = stored_datasets(home, digits_splits)
    flywheel = FlywheelHome(home=str(home))
    (home / "flywheel.yaml").write_text("trained_model:\n  recipe: none\n  width: 16\n")
    assets = [ffcv_datasets, tuned_hyperparameters, trained_model]

    tuned = dg.materialize(
        assets, selection=["tuned_hyperparameters"], resources=resources_for(home),
        run_config={"ops": {"tuned_hyperparameters": {"config": {"trials": 2, "trial_epochs": 2, "warmup_epochs": 1}}}},
    )
    metadata = tuned.asset_materializations_for_node("tuned_hyperparameters")[0].metadata
    best = tuned.output_for_node("tuned_hyperparameters")["best"]
    assert metadata["trials_added"].value == 2 and metadata["best_trial"].value == best["trial"]
    assert metadata["best_val_loss"].value == best["val_loss"] == min(
        row["val_loss"] for row in tuned.output_for_node("tuned_hyperparameters")["trials"] if row["state"] == "complete"
    )
    assert "| trial | state" in metadata["trials"].value
    assert metadata["intermediate_values"].value.startswith("![intermediate_values](data:image/png;base64,")

    trained = dg.materialize(
        assets, selection=["trained_model"], resources=resources_for(home),
        run_config={"ops": {"trained_model": {"config": {**FAST_TRAINING, "epochs": 1, "recipe": "none", "width": 16}}}},
    )
    value = trained.output_for_node("trained_model")
    fit_config = json.loads((flywheel.checkpoints / value["attempt"] / "fit_config.json").read_text())
    assert value["tuned_from"] == f"{best['study']} trial {best['trial']}"
    assert fit_config["optim"]["learning_rate"] == best["values"]["learning_rate"]
    assert fit_config["optim"]["weight_decay"] == best["values"]["weight_decay"]
    assert fit_config["augment"]["label_smoothing"] == best["values"]["label_smoothing"]

    # Values tuned for another network are not used for this one, and the run says why.
    from orchestration.assets.training import TrainingConfig, with_tuned_values

    config, metadata = with_tuned_values(dg.build_asset_context(), TrainingConfig(backbone="resnet18"), flywheel, datasets)
    assert config.learning_rate == TrainingConfig().learning_rate
    assert metadata["tuned_from"] == "none (tuned for backbone resnet_small from scratch, this training is resnet18 from scratch)"
