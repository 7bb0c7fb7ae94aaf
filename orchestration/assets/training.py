"""Training: torchrun launched through Dagster Pipes, so distributed training runs as its own
process group (Lightning's DDP launcher would otherwise re-execute Dagster itself)."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from orchestration.metadata import inputs_fingerprint
from orchestration.resources import FlywheelHome, TrainingCompute
from training.config import RESULT_FILE, FitConfig, ModelConfig, OptimConfig
from training.distributed_run import FAILURE_FILE_ENV
from training.registry import Registry


MODEL_FIELDS, OPTIM_FIELDS = ModelConfig.model_fields, OptimConfig.model_fields


class TrainingConfig(dg.Config):
    """The run's recipe. Defaults, limits and descriptions are `training.config`'s, so they live once."""

    backbone: Literal["resnet_small"] = MODEL_FIELDS["backbone"]
    width: int = MODEL_FIELDS["width"]
    blocks_per_stage: int = MODEL_FIELDS["blocks_per_stage"]
    epochs: int = OPTIM_FIELDS["epochs"]
    batch_size: int = OPTIM_FIELDS["batch_size"]
    optimizer: Literal["adamw", "sgd"] = OPTIM_FIELDS["optimizer"]
    schedule: Literal["onecycle", "cosine", "constant"] = OPTIM_FIELDS["schedule"]
    learning_rate: float = OPTIM_FIELDS["learning_rate"]
    weight_decay: float = OPTIM_FIELDS["weight_decay"]
    seed: int = OPTIM_FIELDS["seed"]
    warm_start: bool = Field(False, description="Start from the champion's weights instead of from scratch.")

    def model(self, num_classes: int, resolution: int) -> ModelConfig:
        return ModelConfig(**self.model_dump(include=set(MODEL_FIELDS)), num_classes=num_classes, resolution=resolution)

    def optim(self) -> OptimConfig:
        return OptimConfig(**self.model_dump(include=set(OPTIM_FIELDS)))


def attempt_id(datasets: dict, fit_payload: dict) -> str:
    """Same datasets and same configuration -> same attempt folder, so a re-run resumes it."""
    return inputs_fingerprint([datasets["splits"], fit_payload])


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
    model = config.model(len(ffcv_datasets["classes"]), ffcv_datasets["resolution"])
    optim = config.optim()
    payload = {
        "model": model.model_dump(),
        "optim": optim.model_dump(),
        "compute": compute.compute_config(),
        "warm_start": str(champion.weights) if champion and config.warm_start else None,
    }
    run_dir = flywheel.checkpoints / attempt_id(ffcv_datasets, payload)
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
        "model": model.model_dump(),
        "training_batches": ffcv_datasets["splits"]["train"]["batches"],
        "parent_champion": champion.version if champion else None,
    }
    return dg.Output(value, metadata={**reported, "attempt": run_dir.name, "training_batches": len(value["training_batches"])})
