"""Training: torchrun launched through Dagster Pipes, so distributed training runs as its own
process group (Lightning's DDP launcher would otherwise re-execute Dagster itself)."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field, field_validator, model_validator

from orchestration.io_manager import stored_values
from orchestration.metadata import accuracy_text, inputs_fingerprint, markdown_image, markdown_table, readable
from orchestration.resources import FlywheelHome, TrainingCompute, environment_executable
from training.config import (
    RECIPES, RESULT_FILE, TUNED_FILE, AugmentConfig, FitConfig, IncrementalConfig, ModelConfig, OptimConfig, SearchSpace, TuneConfig, TunedHyperparameters,
    backbone_source,
)
from training.distributed_run import FAILURE_FILE_ENV
from training.results import FitResult
from training.registry import ModelVersion, Registry
from training.replay import ReplaySelection, replay_selection


MODEL_FIELDS, OPTIM_FIELDS, AUGMENT_FIELDS = ModelConfig.model_fields, OptimConfig.model_fields, AugmentConfig.model_fields
INCREMENTAL_FIELDS = IncrementalConfig.model_fields
# What makes the champion's weights the network this training would build.
NETWORK_FIELDS = ("backbone", "width", "blocks_per_stage", "resolution", "num_classes")
TUNE_FIELDS = TuneConfig.model_fields


def _search_range(name: str) -> object:
    field = SearchSpace.model_fields[name]
    return Field(list(field.default), description=f"{field.description} [low, high].")


def _recipe_override(name: str) -> object:
    return Field(None, description=f"{AUGMENT_FIELDS[name].description} Unset: the recipe's.")


class TrainingConfig(dg.Config):
    """The run's recipe. Defaults, limits and descriptions are `training.config`'s, so they live once."""

    backbone: str = MODEL_FIELDS["backbone"]
    pretrained: str | None = Field(
        None, description=f"{MODEL_FIELDS['pretrained'].description} A relative path is under $FLYWHEEL_HOME/pretrained/.",
    )
    width: int = MODEL_FIELDS["width"]
    blocks_per_stage: int = MODEL_FIELDS["blocks_per_stage"]
    epochs: int = OPTIM_FIELDS["epochs"]
    batch_size: int = OPTIM_FIELDS["batch_size"]
    optimizer: Literal["adamw", "sgd"] = OPTIM_FIELDS["optimizer"]
    schedule: Literal["onecycle", "cosine", "constant"] = OPTIM_FIELDS["schedule"]
    learning_rate: float = OPTIM_FIELDS["learning_rate"]
    reference_batch: int = OPTIM_FIELDS["reference_batch"]
    accumulate_grad_batches: int = OPTIM_FIELDS["accumulate_grad_batches"]
    early_stopping_patience: int | None = OPTIM_FIELDS["early_stopping_patience"]
    weight_decay: float = OPTIM_FIELDS["weight_decay"]
    freeze_epochs: int = OPTIM_FIELDS["freeze_epochs"]
    backbone_lr_ratio: float = OPTIM_FIELDS["backbone_lr_ratio"]
    seed: int = OPTIM_FIELDS["seed"]
    test_time_flip: bool = MODEL_FIELDS["test_time_flip"]
    batchnorm_momentum: float | None = MODEL_FIELDS["batchnorm_momentum"]
    recipe: str = Field(
        "small_images", description=f"Augmentation recipe: {', '.join(RECIPES)} (training.config.RECIPES); the fields below override it.",
    )
    random_resized_crop: bool | None = _recipe_override("random_resized_crop")
    crop_scale: list[float] | None = _recipe_override("crop_scale")
    horizontal_flip: bool | None = _recipe_override("horizontal_flip")
    translate: int | None = _recipe_override("translate")
    cutout: int | None = _recipe_override("cutout")
    color_jitter: float | None = _recipe_override("color_jitter")
    label_smoothing: float | None = _recipe_override("label_smoothing")
    ema_decay: float | None = _recipe_override("ema_decay")
    start_resolution: int | None = _recipe_override("start_resolution")
    warm_start: bool = Field(False, description="Start from the champion's weights instead of from scratch.")
    mode: Literal["full", "incremental"] = Field(
        "full", description="full: train on every labeled training example; incremental: fine-tune the champion on the "
        "batches it has not trained on and a replay sample of the rest (the retraining policy chooses for the runs it launches).",
    )
    incremental_epochs: int | None = INCREMENTAL_FIELDS["epochs"]
    incremental_learning_rate_scale: float = INCREMENTAL_FIELDS["learning_rate_scale"]
    replay_ratio: float = INCREMENTAL_FIELDS["replay_ratio"]
    new_passes: int = INCREMENTAL_FIELDS["new_passes"]
    incremental_distillation: float = INCREMENTAL_FIELDS["distillation"]
    audit_examples: bool = Field(
        False, description="Each training process writes a digest of every image of its first epoch to the attempt's audit/ "
        "folder: proof that the processes (torchrun's or a Ray cluster's) saw disjoint shares of the data.",
    )
    use_tuned: bool = Field(
        True, description="Take the values of the best trial of the latest tune run (tuned_hyperparameters) for the "
        "fields it searched, when it tuned this backbone and start; off: these settings as they are.",
    )

    def model(self, num_classes: int, resolution: int, pretrained_dir: Path) -> ModelConfig:
        return ModelConfig(
            **self.model_dump(include=set(MODEL_FIELDS) - {"pretrained"}), num_classes=num_classes, resolution=resolution,
            pretrained=pretrained_dir / self.pretrained if self.pretrained else None,  # an absolute path stays itself
        )

    def optim(self) -> OptimConfig:
        return OptimConfig(**self.model_dump(include=set(OPTIM_FIELDS)))

    def incremental(self) -> IncrementalConfig:
        return IncrementalConfig(
            epochs=self.incremental_epochs, learning_rate_scale=self.incremental_learning_rate_scale,
            replay_ratio=self.replay_ratio, new_passes=self.new_passes, distillation=self.incremental_distillation,
        )

    # Checked here too, so a wrong value in flywheel.yaml is the settings file's one-line error.
    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, backbone: str) -> str:
        backbone_source(backbone)
        return backbone

    @model_validator(mode="after")
    def _valid_recipe(self) -> "TrainingConfig":
        self.augment()
        return self

    def augment(self) -> AugmentConfig:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown augmentation recipe {self.recipe!r}: one of {', '.join(RECIPES)}")
        overrides = {name: value for name, value in self.model_dump(include=set(AUGMENT_FIELDS)).items() if value is not None}
        return AugmentConfig(**(RECIPES[self.recipe].model_dump() | overrides))


def attempt_id(datasets: dict, fit_payload: dict, pretrained: Path | None) -> str:
    """Same datasets and same configuration -> same attempt folder, so a re-run resumes it. A
    pretrained checkpoint counts by its size and modification time too: a file replaced at the
    same path starts a new attempt."""
    stamp = [pretrained.stat().st_size, pretrained.stat().st_mtime_ns] if pretrained else None
    return inputs_fingerprint([datasets["splits"], fit_payload, stamp])


@dataclass(frozen=True)
class TrainingPlan:
    """How a training runs: in full, or fine-tuning the champion on the rows `selection` picks."""

    mode: Literal["full", "incremental"]
    reason: str
    selection: ReplaySelection | None = None

    def rows_digest(self) -> str | None:
        return hashlib.md5(self.selection.indices.tobytes()).hexdigest() if self.selection is not None else None


def training_plan(config: TrainingConfig, champion: ModelVersion | None, model: ModelConfig, ffcv_datasets: dict) -> TrainingPlan:
    """An incremental retraining when it was asked for, the champion can be fine-tuned into this
    training's model (the same network and recipe, and batches of the training split it has not seen),
    and fine-tuning trains fewer examples than a full retraining would. Otherwise a full one, and why."""
    if config.mode == "full":
        return TrainingPlan("full", "a full retraining was asked for")
    if champion is None:
        return TrainingPlan("full", "there is no champion to fine-tune")
    card = champion.card()
    changed = [name for name in NETWORK_FIELDS if getattr(card.model, name) != getattr(model, name)]
    if changed:
        return TrainingPlan("full", f"this network differs from the champion {champion.version}'s in {', '.join(changed)}")
    if card.augment is not None and card.augment != config.augment():
        return TrainingPlan("full", f"the augmentation recipe changed since the champion {champion.version}")
    train = ffcv_datasets["splits"]["train"]
    seen = set(card.lineage.training_batches)
    new = [batch for batch in train["batches"] if batch not in seen]
    if not new:
        return TrainingPlan("full", f"the champion {champion.version} trained on every batch of the training split")
    selection = replay_selection(Path(train["index"]), new, config.replay_ratio, config.seed, config.new_passes)
    # In a young project the replay is all of the history and the new rows count twice: fine-tuning can
    # train more examples than a full retraining, which then costs less and forgets nothing.
    optim = config.optim()
    incremental_epochs = config.incremental().fine_tune(optim).epochs
    incremental_passes, full_passes = len(selection.indices) * incremental_epochs, train["examples"] * optim.epochs
    if incremental_passes >= full_passes:
        return TrainingPlan("full", (
            f"fine-tuning the champion {champion.version} would train {incremental_passes:,} examples ({len(selection.indices):,} "
            f"per epoch x {incremental_epochs}: the new batches' {selection.new_examples:,} x{selection.new_passes} and "
            f"{selection.replay_examples:,} replayed) against a full retraining's {full_passes:,} ({train['examples']:,} x "
            f"{optim.epochs}): the history is too small for fine-tuning to save time"
        ))
    return TrainingPlan("incremental", (
        f"fine-tunes the champion {champion.version} on {selection.new_examples} training examples of {len(new)} new "
        f"batch(es) ({', '.join(new[:5])}{', ...' if len(new) > 5 else ''}), {selection.new_passes}x per epoch, "
        f"and {selection.replay_examples} replayed of "
        f"its {selection.history_examples}, class-balanced"
        + (f", distilling its predictions where they are right (weight {config.incremental_distillation:g})" if config.incremental_distillation else "")
    ), selection)


def fit_config(
    context: dg.AssetExecutionContext, config: TrainingConfig, flywheel: FlywheelHome, compute: dict,
    ffcv_datasets: dict, warm_start: str | None, run_root: Path, run_prefix: str, plan: TrainingPlan | None = None,
) -> FitConfig:
    """The training `config` asks for, in an attempt folder under `run_root` named by its inputs. A
    configured pretrained file that is missing fails here, with what to fetch, before anything launches."""
    model = config.model(len(ffcv_datasets["classes"]), ffcv_datasets["resolution"], flywheel.pretrained)
    if model.pretrained and not model.pretrained.is_file():
        from training.backbones import missing_weights_message

        raise dg.Failure(description=missing_weights_message(model.backbone, model.pretrained))
    optim = config.optim()
    if plan is not None and plan.selection is not None:
        optim = config.incremental().fine_tune(optim)
    payload = {
        "model": model.model_dump(mode="json"),
        "optim": optim.model_dump(),
        "augment": config.augment().model_dump(mode="json"),
        "compute": compute,
        "warm_start": warm_start,
    }
    rows = plan.rows_digest() if plan is not None else None
    run_dir = run_root / attempt_id(ffcv_datasets, payload | ({"train_rows": rows} if rows else {}), model.pretrained)
    return FitConfig(
        beton_dir=Path(ffcv_datasets["dir"]),
        run_dir=run_dir,
        wandb_save_dir=flywheel.root,
        run_name=f"{run_prefix}-{run_dir.name}",
        tags={"dagster_run": context.run_id},
        reason=context.run.tags.get("flywheel/reason", "manual"),
        train_indices=run_dir / "train_rows.npy" if rows else None,
        audit_examples=config.audit_examples,
        **payload,
    )


def tuned_values(flywheel: FlywheelHome) -> TunedHyperparameters | None:
    """The best configuration of the latest `tune` run, if there was one."""
    stored = stored_values(flywheel, "tuned_hyperparameters")
    return TunedHyperparameters.model_validate(stored[-1]["best"]) if stored else None


def with_tuned_values(context: dg.AssetExecutionContext, config: TrainingConfig, flywheel: FlywheelHome, ffcv_datasets: dict) -> tuple[TrainingConfig, dict]:
    """`config` with the best tuning trial's values when there is one for this backbone and start
    (and use_tuned is on), and the metadata that says what was taken."""
    tuned = tuned_values(flywheel) if config.use_tuned else None
    if tuned is None:
        return config, {"tuned_from": "none"}
    model = config.model(len(ffcv_datasets["classes"]), ffcv_datasets["resolution"], flywheel.pretrained)
    if reason := tuned.mismatch(model):
        context.log.warning(f"tuned hyperparameters of study {tuned.study} not used: {reason}")
        return config, {"tuned_from": f"none ({reason})"}
    changes = ", ".join(f"{name} {getattr(config, name)} -> {value:.4g}" for name, value in tuned.values.items())
    context.log.info(
        f"tuned hyperparameters of study {tuned.study} trial {tuned.trial} (val loss {tuned.val_loss:.4f}, accuracy "
        f"{tuned.val_accuracy:.4f}): {changes}"
    )
    return config.model_copy(update=tuned.values), {
        "tuned_from": f"{tuned.study} trial {tuned.trial}", "tuned_values": dg.MetadataValue.json(tuned.values),
    }


def champion_warm_start(context: dg.AssetExecutionContext, champion: ModelVersion | None, config: TrainingConfig) -> str | None:
    """The champion's weights to start from, when it is the same network (a new head is fine)."""
    if champion is None:
        return None
    backbone = champion.card().model.backbone
    if backbone != config.backbone:
        context.log.warning(f"no warm start: the champion {champion.version} is a {backbone}, this training a {config.backbone}")
        return None
    return str(champion.weights)


def launch_training(context: dg.AssetExecutionContext, compute: TrainingCompute, fit: FitConfig, config_path: Path, data_root: Path) -> dict:
    """Run the training where `compute` says and return what it reported: torchrun or a Ray Train job's
    driver through Pipes, or Kubernetes pods (whose rank 0 leaves result.json on the data root's volume)."""
    if compute.launcher == "kubernetes":
        from orchestration.kubernetes import job_name, train_on_kubernetes

        train_on_kubernetes(context, fit.compute, config_path, data_root, job_name(fit.run_dir.name, context.run_id))
        result = FitResult(**json.loads((fit.run_dir / RESULT_FILE).read_text()))
        return result.metadata() | {"weights_path": dg.MetadataValue.path(result.weights_path)}  # Pipes' form, as a value
    command = compute.launch_command(config_path)
    context.log.info(f"training attempt {fit.run_dir.name}: {' '.join(command)}")
    failure_file = fit.run_dir / "failure.txt"
    failure_file.unlink(missing_ok=True)
    try:
        invocation = dg.PipesSubprocessClient().run(
            command=command, context=context, env={"PYTHONUNBUFFERED": "1", FAILURE_FILE_ENV: str(failure_file)},
        )
    except Exception as error:
        # The launcher's one line (which worker died, by which signal or exception; an unreachable
        # cluster) instead of Pipes' "process failed with code 1".
        if failure_file.exists():
            raise dg.Failure(description=f"training failed: {failure_file.read_text().strip()}") from error
        raise
    return invocation.get_materialize_result().metadata or {}


@dg.asset(
    description="A candidate classifier trained with Lightning on the FFCV datasets (DDP when several "
    "processes run), checkpointed every epoch and logged to W&B. Takes the best values of the latest "
    "tune run (tuned_hyperparameters) unless use_tuned is off.",
    group_name="training",
    kinds={"pytorch", "wandb"},
    pool="gpu",
    deps=["tuned_hyperparameters"],
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    flywheel: FlywheelHome,
    compute: TrainingCompute,
    ffcv_datasets: dict,
) -> dg.Output[dict]:
    champion = Registry(flywheel.registry).champion()
    config, tuned_metadata = with_tuned_values(context, config, flywheel, ffcv_datasets)
    plan = training_plan(
        config, champion, config.model(len(ffcv_datasets["classes"]), ffcv_datasets["resolution"], flywheel.pretrained), ffcv_datasets,
    )
    context.log.info(f"{plan.mode} training: {plan.reason}")
    if plan.mode == "incremental":
        warm_start = str(champion.weights)
    else:
        warm_start = champion_warm_start(context, champion, config) if config.warm_start else None
    fit = fit_config(
        context, config, flywheel, compute.compute_config(), ffcv_datasets, warm_start, flywheel.checkpoints, "train", plan,
    )
    run_dir = fit.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if fit.train_indices is not None:
        np.save(fit.train_indices, plan.selection.indices)
    config_path = run_dir / "fit_config.json"
    config_path.write_text(fit.model_dump_json(indent=2))
    reported = launch_training(context, compute, fit, config_path, flywheel.root)
    result = json.loads((run_dir / RESULT_FILE).read_text())
    value = {
        **result,
        "attempt": run_dir.name,
        "model": fit.model.model_dump(mode="json"),
        "augment": fit.augment.model_dump(mode="json"),
        "optim": fit.optim.model_dump(),
        "tuned_from": tuned_metadata["tuned_from"],
        # An incremental candidate learned every batch: the new ones now, the others through its parent.
        "training_batches": ffcv_datasets["splits"]["train"]["batches"],
        "parent_champion": champion.version if champion else None,
        "mode": plan.mode,
    }
    selection = plan.selection
    return dg.Output(value, metadata=readable({
        **reported, "val_accuracy": accuracy_text(result["val_accuracy"], ffcv_datasets["splits"]["val"]["examples"]),
        **tuned_metadata, "attempt": run_dir.name, "training_batches": len(value["training_batches"]),
        "mode": plan.mode, "mode_reason": plan.reason,
        "trained_examples": len(selection.indices) if selection else ffcv_datasets["splits"]["train"]["examples"],
        **({"new_examples": selection.new_examples, "new_passes": selection.new_passes, "replay_examples": selection.replay_examples,
            "distillation": fit.optim.distillation} if selection else {}),
    }))


class TuneJobConfig(dg.Config):
    """The search around `trained_model`'s settings (flywheel.yaml's trained_model section). Defaults
    and descriptions are `training.config`'s."""

    trials: int = TUNE_FIELDS["trials"]
    timeout_minutes: float | None = TUNE_FIELDS["timeout_minutes"]
    trial_epochs: int | None = TUNE_FIELDS["trial_epochs"]
    startup_trials: int = TUNE_FIELDS["startup_trials"]
    warmup_epochs: int = TUNE_FIELDS["warmup_epochs"]
    learning_rate: list[float] = _search_range("learning_rate")
    weight_decay: list[float] = _search_range("weight_decay")
    label_smoothing: list[float] = _search_range("label_smoothing")
    backbone_lr_ratio: list[float] = _search_range("backbone_lr_ratio")

    @model_validator(mode="after")
    def _valid_space(self) -> "TuneJobConfig":
        self.space()
        return self

    def space(self) -> SearchSpace:
        return SearchSpace(**self.model_dump(include=set(SearchSpace.model_fields)))


@dg.asset(
    description="Optuna's search over the training's learning rate, weight decay, label smoothing (and, "
    "from pretrained weights, the backbone's rate ratio) for the lowest validation cross-entropy: trials "
    "of the configured training, pruned after an epoch worse than the median, each a W&B run of the study's group. Its best values are "
    "what the next trained_model uses; the promotion gates still decide what ships.",
    group_name="training",
    kinds={"optuna", "pytorch", "wandb"},
    pool="gpu",
)
def tuned_hyperparameters(
    context: dg.AssetExecutionContext,
    config: TuneJobConfig,
    flywheel: FlywheelHome,
    compute: TrainingCompute,
    ffcv_datasets: dict,
) -> dg.Output[dict]:
    from orchestration.settings import current_settings  # here: the settings module imports this one

    training = TrainingConfig(**current_settings(flywheel).get("trained_model", {}))
    # One process on one device: trials run one after another in it, so FFCV's compiled pipeline and
    # the CUDA context are paid for once, not per trial.
    single = compute.compute_config() | {"devices": 1, "num_nodes": 1, "strategy": "auto"}
    base = fit_config(context, training, flywheel, single, ffcv_datasets, None, flywheel.tuning, "tune")
    study = base.run_dir.name
    tune = TuneConfig(
        base=base, study_name=f"study-{study}", storage=flywheel.tuning / f"{study}.journal",
        space=config.space(), **config.model_dump(include=set(TUNE_FIELDS) - {"space"}),
    )
    base.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = base.run_dir / "tune_config.json"
    config_path.write_text(tune.model_dump_json(indent=2))
    context.log.info(f"study {tune.study_name}: {config.trials} more trials, journal {tune.storage}")
    invocation = dg.PipesSubprocessClient().run(
        command=[environment_executable("python"), "-m", "training.tune", str(config_path)],
        context=context,
        env={"PYTHONUNBUFFERED": "1"},
    )
    reported = invocation.get_materialize_result().metadata or {}
    result = json.loads((base.run_dir / TUNED_FILE).read_text())
    trials = pl.DataFrame(result["trials"]).with_columns(pl.col("val_loss", "val_accuracy").round(4))
    return dg.Output(result, metadata={
        **reported,
        "trials": markdown_table(trials),
        **{Path(plot).stem: markdown_image(Path(plot), Path(plot).stem) for plot in result["plots"]},
    })
