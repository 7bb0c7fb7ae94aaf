"""Training: torchrun launched through Dagster Pipes, so distributed training runs as its own
process group (Lightning's DDP launcher would otherwise re-execute Dagster itself)."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field, field_validator, model_validator

from orchestration.metadata import inputs_fingerprint
from orchestration.resources import FlywheelHome, TrainingCompute
from training.config import RECIPES, RESULT_FILE, AugmentConfig, FitConfig, ModelConfig, OptimConfig, backbone_source
from training.distributed_run import FAILURE_FILE_ENV
from training.registry import Registry


MODEL_FIELDS, OPTIM_FIELDS, AUGMENT_FIELDS = ModelConfig.model_fields, OptimConfig.model_fields, AugmentConfig.model_fields


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
    recipe: str = Field(
        "small_images", description=f"Augmentation recipe: {', '.join(RECIPES)} (training.config.RECIPES); the fields below override it.",
    )
    random_resized_crop: bool | None = _recipe_override("random_resized_crop")
    crop_scale: list[float] | None = _recipe_override("crop_scale")
    horizontal_flip: bool | None = _recipe_override("horizontal_flip")
    translate: int | None = _recipe_override("translate")
    cutout: int | None = _recipe_override("cutout")
    label_smoothing: float | None = _recipe_override("label_smoothing")
    ema_decay: float | None = _recipe_override("ema_decay")
    start_resolution: int | None = _recipe_override("start_resolution")
    warm_start: bool = Field(False, description="Start from the champion's weights instead of from scratch.")

    def model(self, num_classes: int, resolution: int, pretrained_dir: Path) -> ModelConfig:
        return ModelConfig(
            **self.model_dump(include=set(MODEL_FIELDS) - {"pretrained"}), num_classes=num_classes, resolution=resolution,
            pretrained=pretrained_dir / self.pretrained if self.pretrained else None,  # an absolute path stays itself
        )

    def optim(self) -> OptimConfig:
        return OptimConfig(**self.model_dump(include=set(OPTIM_FIELDS)))

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


@dg.asset(
    description="A candidate classifier trained with Lightning on the FFCV datasets (DDP when several "
    "processes run), checkpointed every epoch and logged to W&B.",
    group_name="training",
    kinds={"pytorch", "wandb"},
    pool="gpu",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    flywheel: FlywheelHome,
    compute: TrainingCompute,
    ffcv_datasets: dict,
) -> dg.Output[dict]:
    champion = Registry(flywheel.registry).champion()
    model = config.model(len(ffcv_datasets["classes"]), ffcv_datasets["resolution"], flywheel.pretrained)
    if model.pretrained and not model.pretrained.is_file():
        from training.backbones import missing_weights_message

        raise dg.Failure(description=missing_weights_message(model.backbone, model.pretrained))
    optim = config.optim()
    payload = {
        "model": model.model_dump(mode="json"),
        "optim": optim.model_dump(),
        "augment": config.augment().model_dump(mode="json"),
        "compute": compute.compute_config(),
        "warm_start": str(champion.weights) if champion and config.warm_start else None,
    }
    run_dir = flywheel.checkpoints / attempt_id(ffcv_datasets, payload, model.pretrained)
    fit_config = FitConfig(
        beton_dir=Path(ffcv_datasets["dir"]),
        run_dir=run_dir,
        wandb_save_dir=flywheel.root,
        run_name=f"train-{run_dir.name}",
        tags={"dagster_run": context.run_id},
        reason=context.run.tags.get("flywheel/reason", "manual"),
        **payload,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "fit_config.json"
    config_path.write_text(fit_config.model_dump_json(indent=2))
    context.log.info(f"training attempt {run_dir.name}: {' '.join(compute.torchrun_command(config_path))}")

    failure_file = run_dir / "failure.txt"
    failure_file.unlink(missing_ok=True)
    try:
        invocation = dg.PipesSubprocessClient().run(
            command=compute.torchrun_command(config_path),
            context=context,
            env={"PYTHONUNBUFFERED": "1", FAILURE_FILE_ENV: str(failure_file)},
        )
    except Exception as error:
        # The launcher's one line (which worker died, by which signal or exception) instead of
        # Pipes' "process failed with code 1".
        if failure_file.exists():
            raise dg.Failure(description=f"training failed: {failure_file.read_text().strip()}") from error
        raise
    reported = invocation.get_materialize_result().metadata or {}
    result = json.loads((run_dir / RESULT_FILE).read_text())
    value = {
        **result,
        "attempt": run_dir.name,
        "model": model.model_dump(mode="json"),
        "augment": payload["augment"],
        "training_batches": ffcv_datasets["splits"]["train"]["batches"],
        "parent_champion": champion.version if champion else None,
    }
    return dg.Output(value, metadata={**reported, "attempt": run_dir.name, "training_batches": len(value["training_batches"])})
