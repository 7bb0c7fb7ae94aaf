"""The training entry point: `fit(config)` returns its metrics; `python -m training.fit CONFIG.json`
is what torchrun runs on every rank. Rank 0 reports to Dagster through Pipes when launched by it.

A training attempt lives in `config.run_dir`: `last.ckpt` rewritten every epoch and the best epoch's, the
best weights as safetensors, and `result.json`. Launching the same attempt again resumes from
`last.ckpt` instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from safetensors.torch import save_file
from torch.distributed.elastic.multiprocessing.errors import record

from training.config import RESULT_FILE, ComputeConfig, FitConfig
from training.data import FFCVDataModule, loader_threads
from training.distributed_run import entry_config
from training.backbones import build_network, load_pretrained
from training.model import FreezeBackbone, LitClassifier, ProgressiveResizing
from training.inference import load_weights
from training.results import FitResult
from training.tracking import wandb_mode

WEIGHTS_FILE = "weights.safetensors"


def on_gpus(compute: ComputeConfig) -> bool:
    return compute.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()


def resolve_precision(compute: ComputeConfig) -> str:
    if compute.precision:
        return compute.precision
    if on_gpus(compute):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class StepTimer(Callback):
    """Times each training batch's wait for the loader apart from its step (forward, backward and
    optimizer, synchronised on GPUs), from the second batch on: the first pays FFCV's numba
    compilation (where the loader is compiled), kernel selection and torch.compile, which are
    warm-up, not training speed. Logs per epoch `throughput/images_per_s` (all processes),
    `throughput/step_images_per_s` (what the steps alone would do: the ceiling a faster loader could
    reach) and `throughput/loader_wait_share` (the share of the time spent waiting for data; high
    means the loader is the bottleneck)."""

    def __init__(self):
        self.warmup_seconds: float | None = None
        self.totals = {"images": 0, "wait": 0.0, "step": 0.0}
        self.epoch = dict(self.totals)
        self.started = self.batch_started = self.last_batch_ended = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch = {"images": 0, "wait": 0.0, "step": 0.0}
        self.last_batch_ended = time.perf_counter()  # the loader starts its epoch now

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.batch_started = time.perf_counter()
        if self.warmup_seconds is not None:
            self.epoch["wait"] += self.batch_started - self.last_batch_ended

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.last_batch_ended = time.perf_counter()
        if self.warmup_seconds is None:
            self.warmup_seconds = self.last_batch_ended - self.started
            return
        self.epoch["step"] += self.last_batch_ended - self.batch_started
        self.epoch["images"] += len(batch[1]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for key, value in self.epoch.items():
            self.totals[key] += value
        # Every rank logs (sync_dist reduces across them), or one without timed batches would hang the others.
        for name, value in self.rates(self.epoch).items():
            pl_module.log(f"throughput/{name}", value, on_epoch=True, sync_dist=True)

    @staticmethod
    def rates(times: dict) -> dict[str, float]:
        busy = times["wait"] + times["step"]
        return {
            "images_per_s": times["images"] / busy if busy else 0.0,
            "step_images_per_s": times["images"] / times["step"] if times["step"] else 0.0,
            "loader_wait_share": times["wait"] / busy if busy else 0.0,
        }

    def summary(self) -> dict[str, float]:
        return {"warmup_seconds": round(self.warmup_seconds or 0.0, 2), **{k: round(v, 4) for k, v in self.rates(self.totals).items()}}


class EpochReporter(Callback):
    """Sends one line per epoch to a log function (Dagster's, through Pipes, or stderr): after the
    epoch's validation and its throughput (StepTimer, listed before it)."""

    def __init__(self, log):
        self.report = log

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        self.report(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {trainer.global_step}: {metrics}")


class ExampleAudit(Callback):
    """Writes, per rank, a digest of every training image of the first epoch: proof of how the data
    was sharded across processes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.digests: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 0:
            images = batch[0].cpu().numpy()
            self.digests += [hashlib.sha1(image.tobytes()).hexdigest() for image in images]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.digests))


def _last_checkpoint_step(path: Path) -> int:
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))


def warm_start(network: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load every weight whose name and shape match; returns the names that keep their fresh initialisation."""
    own = network.state_dict()
    shared = {name: tensor for name, tensor in weights.items() if name in own and own[name].shape == tensor.shape}
    network.load_state_dict(shared, strict=False)
    return sorted(set(own) - set(shared))


def distillation_teacher(config: FitConfig, start_weights: dict[str, torch.Tensor] | None, log) -> torch.nn.Module | None:
    """The warm start's network, whose predictions the training distils (`optim.distillation`); None
    when distillation is off or the warm start does not fit this network whole (a head grown for new
    classes has no teacher logits for them)."""
    if not config.optim.distillation or start_weights is None:
        return None
    teacher = build_network(config.model)
    if unfit := warm_start(teacher, start_weights):
        log(f"no distillation: {', '.join(unfit)} of {config.warm_start} do not fit this network")
        return None
    return teacher


def ema_weight_averaging(decay: float) -> WeightAveraging:
    """Lightning's weight averaging with an exponential moving average whose decay warms up, as timm's
    ModelEmaV3 does: min(decay, (1 + n) / (10 + n)) after n updates. A fixed 0.999 averages over ~1,000
    steps, so after a short run the average is mostly the initial weights: measured on 560 digits
    (140 steps), 0.17 test accuracy against 0.99 for the trained weights."""

    @torch.no_grad()
    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        rate = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay)
        return rate * averaged + (1 - rate) * current

    return WeightAveraging(avg_fn=update)


def recipe_callbacks(config: FitConfig) -> list[Callback]:
    """The Lightning callbacks the recipe asks for: a frozen first phase, weight averaging, growing crops."""
    callbacks: list[Callback] = []
    if config.optim.freeze_epochs:
        callbacks.append(FreezeBackbone(config.optim.freeze_epochs))
    if config.augment.ema_decay:
        callbacks.append(ema_weight_averaging(config.augment.ema_decay))
    if config.optim.early_stopping_patience:
        callbacks.append(EarlyStopping("val/accuracy", mode="max", patience=config.optim.early_stopping_patience))
    if config.augment.start_resolution:
        callbacks.append(ProgressiveResizing(config.augment.start_resolution, config.model.resolution, config.optim.epochs))
    return callbacks


def placement(compute: ComputeConfig) -> tuple[dict, list[Callback]]:
    """The Trainer's process layout, and the callbacks it needs: torchrun's processes (the environment
    torchrun sets, on this machine or in Kubernetes pods), or a Ray Train worker's (Ray's rank,
    process group and checkpoint reporting)."""
    if compute.launcher != "ray":
        return {"devices": compute.devices, "num_nodes": compute.num_nodes, "strategy": compute.strategy}, []
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback

    return {"devices": "auto", "strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()]}, [RayTrainReportCallback()]


def fit(
    config: FitConfig, log=lambda message: print(message, file=sys.stderr), callbacks: Sequence[Callback] = (),
    resume_from: Path | None = None,
) -> FitResult:
    """Train as `config` says; `callbacks` join the recipe's (a tuning trial's pruning callback).
    Resumes from `resume_from` (the checkpoint Ray restarts a worker group with), else from the
    attempt's own last checkpoint when there is one."""
    started = time.perf_counter()
    L.seed_everything(config.optim.seed, workers=True, verbose=False)
    checkpoint_dir = config.run_dir / "checkpoints"
    resume_checkpoint = resume_from or checkpoint_dir / "last.ckpt"
    resumed_from = _last_checkpoint_step(resume_checkpoint)

    compiled = on_gpus(config.compute) if config.compute.compile is None else config.compute.compile
    if on_gpus(config.compute):
        torch.set_float32_matmul_precision("high")  # TF32 for what runs in float32 beside bf16 autocast
    start_weights = load_weights(config.warm_start) if config.warm_start else None
    model = LitClassifier(
        config.model.model_dump(mode="json"), config.optim.model_dump(), compile=compiled,
        label_smoothing=config.augment.label_smoothing, teacher=distillation_teacher(config, start_weights, log),
    )
    if config.model.pretrained and not resumed_from:
        dropped = load_pretrained(model.net, config.model.pretrained, config.model.backbone)
        log(f"pretrained weights from {config.model.pretrained}; the head replaces {', '.join(dropped) or 'no classifier'}")
    if start_weights is not None and not resumed_from:
        fresh = warm_start(model.net, start_weights)
        if fresh:
            log(f"warm start from {config.warm_start}: {', '.join(fresh)} start fresh (their shape changed, e.g. a head grown for new classes)")
    threads = loader_threads(config.compute.num_workers)
    datamodule = FFCVDataModule(
        config.beton_dir, config.optim.batch_size, threads, config.optim.seed,
        config.model.resolution, config.augment, np.load(config.train_indices, allow_pickle=False) if config.train_indices else None,
        config.compute.loader_compile_min_images,
    )
    config.wandb_save_dir.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=config.wandb_project,
        name=config.run_name,
        group=config.wandb_group,
        save_dir=str(config.wandb_save_dir),
        mode=wandb_mode(),
        tags=[f"{key}:{value}" for key, value in config.tags.items()],
        notes=config.reason,
        config=json.loads(config.model_dump_json()),
    )
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir,
        filename="epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor="val/accuracy",
        mode="max",
        save_top_k=1,
        every_n_epochs=1,
    )
    # Its own callback, after the best's (so it holds the best's state of the same epoch): Lightning's
    # save_last beside a monitor rewrites last.ckpt only in epochs that improve the monitor, and a
    # resumed or re-launched finished attempt would then train again from its best epoch.
    last_checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False,
    )
    precision = resolve_precision(config.compute)
    timer = StepTimer()
    layout, launcher_callbacks = placement(config.compute)
    trainer = L.Trainer(
        accelerator=config.compute.accelerator,
        **layout,
        sync_batchnorm=config.compute.sync_batchnorm,
        accumulate_grad_batches=config.optim.accumulate_grad_batches,
        precision=precision,
        max_epochs=config.optim.epochs,
        logger=logger,
        callbacks=[checkpoints, last_checkpoint, timer, EpochReporter(log), *recipe_callbacks(config)]
        + ([ExampleAudit(config.run_dir / "audit")] if config.audit_examples else []) + launcher_callbacks + list(callbacks),
        use_distributed_sampler=False,  # FFCV shards the data itself (distributed=True)
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        log_every_n_steps=1,
        fast_dev_run=config.fast_dev_run,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_checkpoint) if resumed_from else None)

    best = checkpoints.best_model_path or str(checkpoint_dir / "last.ckpt")
    weights_path = config.run_dir / WEIGHTS_FILE
    run = logger.experiment if trainer.is_global_zero else None
    result = FitResult(
        weights_path=str(weights_path),
        best_checkpoint=best,
        val_accuracy=float(checkpoints.best_model_score or trainer.callback_metrics.get("val/accuracy", 0.0)),
        val_loss=float(trainer.callback_metrics.get("val/loss", float("nan"))),
        train_accuracy=float(trainer.callback_metrics.get("train/accuracy", float("nan"))),
        epochs_completed=trainer.current_epoch,
        global_step=trainer.global_step,
        resumed_from_step=resumed_from,
        world_size=trainer.world_size,
        train_seconds=round(time.perf_counter() - started, 2),
        wandb_run_id=getattr(run, "id", None),
        wandb_run_dir=getattr(run, "dir", None),
        accelerator=str(trainer.strategy.root_device.type),
        precision=precision,
        compiled=compiled,
        loader_threads=threads,
        **timer.summary(),
    )
    if trainer.is_global_zero:
        if not config.fast_dev_run:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            save_file({k.removeprefix("net."): v.contiguous() for k, v in state.items() if k.startswith("net.")}, weights_path)
        run.summary.update({"best/val_accuracy": result.val_accuracy, "system/platform": platform.platform()})
        (config.run_dir / RESULT_FILE).write_text(result.to_json())
        run.finish()
    return result


@record  # a failing rank leaves its exception in torchrun's error file: the launcher's one-line failure
def main(argv: list[str] | None = None) -> None:
    config = entry_config(FitConfig, "Train a flywheel classifier on FFCV datasets (run under torchrun).", argv)

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if int(os.environ.get("RANK", "0")) == 0 and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            result = fit(config, log=pipes.log.info)
            pipes.report_asset_materialization(metadata=result.metadata())
    else:
        fit(config)


if __name__ == "__main__":
    main()
