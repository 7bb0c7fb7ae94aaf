"""Training as a Ray Train job: `python -m training.ray_train CONFIG.json` is what the `trained_model`
asset launches (through Dagster Pipes) when `compute.launcher` is ray.

This process is the job's driver: it connects to the cluster at `compute.ray_address` and runs a
TorchTrainer whose workers each call `training.fit.fit` (the same code torchrun runs) with Ray's DDP
strategy and environment. Each epoch's checkpoint is reported to Ray; when a worker dies, Ray
restarts the group (up to `compute.max_failures` times) and `fit` resumes from that checkpoint.
Global rank 0 writes the attempt's weights and `result.json` into the run folder, which, like the
FFCV files, sits on storage every node mounts. A failure ends this process with one line, written
to `FAILURE_FILE_ENV`'s file too, as the torchrun launcher does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from training.config import RESULT_FILE, FitConfig
from training.distributed_run import FAILURE_FILE_ENV, entry_config
from training.ray_data import RayLaunchError, connected

def train_worker(payload: dict) -> None:
    """One Ray Train worker: `fit` with Ray's placement, from Ray's latest checkpoint after a restart."""
    import ray.train
    from ray.train.lightning import RayTrainReportCallback

    from training.fit import fit

    config = FitConfig.model_validate_json(payload["config"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        fit(config)
        return
    with checkpoint.as_directory() as folder:
        fit(config, resume_from=Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME)


def worker_config(config: FitConfig) -> FitConfig:
    """The config the workers get: loader threads follow the CPUs each worker reserved."""
    compute = config.compute
    threads = compute.num_workers or max(1, int(compute.cpus_per_worker))
    return config.model_copy(update={"compute": compute.model_copy(update={"num_workers": threads})})


def train_on_ray(config: FitConfig, log=lambda message: print(message, file=sys.stderr)) -> dict:
    """Run the training on the cluster; returns rank 0's result (`result.json`)."""
    import json

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer


    compute = config.compute
    with connected(compute.ray_address, log_to_driver=True):
        resources = {"CPU": compute.cpus_per_worker} | ({"GPU": compute.gpus_per_worker} if compute.gpus_per_worker else {})
        log(f"Ray Train on {compute.ray_address}: {compute.workers} workers of {resources}, up to {compute.max_failures} restarts")
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": worker_config(config).model_dump_json()},
            scaling_config=ScalingConfig(
                num_workers=compute.workers, use_gpu=compute.gpus_per_worker > 0, resources_per_worker=resources,
            ),
            torch_config=TorchConfig(backend="nccl" if compute.gpus_per_worker else "gloo"),
            run_config=RunConfig(
                name="ray",  # the job's checkpoints: <run folder>/ray/checkpoint_*
                storage_path=str(config.run_dir),
                failure_config=FailureConfig(max_failures=compute.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        try:
            trainer.fit()
        except TrainingFailedError as error:
            first = next((line for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise RayLaunchError(
                f"Ray Train job on {compute.ray_address} failed after {compute.max_failures} restart(s): {first.strip()}"
            ) from None
    return json.loads((config.run_dir / RESULT_FILE).read_text())


def main(argv: list[str] | None = None) -> None:
    config = entry_config(FitConfig, "Train a flywheel classifier as a Ray Train job on a cluster.", argv)

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    from training.results import FitResult

    try:
        if PipesEnvVarParamsLoader().is_dagster_pipes_process():
            with open_dagster_pipes() as pipes:
                result = FitResult(**train_on_ray(config, log=pipes.log.info))
                pipes.report_asset_materialization(metadata=result.metadata())
        else:
            train_on_ray(config)
    except RayLaunchError as error:
        if failure_file := os.environ.get(FAILURE_FILE_ENV):
            Path(failure_file).write_text(f"{error}\n")
        sys.exit(str(error))


if __name__ == "__main__":
    main()
