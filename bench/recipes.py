"""Backbones side by side on the digits default: what each costs and buys on this machine.

For every backbone of `training.config.BACKBONES` (or those named), in one run on the same data
(the 1,797 bundled digits at 32 px, 70/15/15 split) and the same recipe:
  1. parameters;
  2. training throughput in images/s, timed from the second training batch, so FFCV's numba
     compilation and the first batch's warm-up are not counted;
  3. test accuracy after the same wall-clock budget of training, also timed from the second batch;
  4. the int8 ONNX model the loop would ship (`export_candidate`, the fastest recipe that keeps
     accuracy): its latency at batch 64, its size, and its accuracy drop against fp32.
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/recipes.py [--budget 90] [--recipe small_images] [--backbones resnet_small resnet18 ...]
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from orchestration.assets.deployment import ExportConfig
from training.config import BACKBONES, RECIPES, ModelConfig, OptimConfig
from training.data import FFCVDataModule, write_beton
from training.evaluate import TestSet
from training.export import export_candidate
from training.inference import predict_torch
from training.model import LitClassifier
from transforms.simulate import digits_pool


class TrainingBudget(L.Callback):
    """Stops training after `seconds` of it, timed from the second batch (the first pays FFCV's numba
    compilation and the kernels' warm-up), and measures the images per second in that time.

    The learning rate follows a cosine over the budget's time, ending near zero as the loop's one-cycle
    schedule does over its epochs. A constant rate (this bench's first version) evaluates weights that
    are still moving fast, whose BatchNorm running statistics lag behind them: MobileNetV3-Large scored
    0.085 (chance) on them, 0.9185 once its statistics were recomputed on 640 training images."""

    def __init__(self, seconds: float):
        self.seconds, self.images, self.started, self.elapsed = seconds, 0, None, 0.0
        self.peak_rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        if not self.peak_rates:
            self.peak_rates = [group["lr"] for group in optimizer.param_groups]
        progress = min(self.elapsed / self.seconds, 1.0)
        for group, peak in zip(optimizer.param_groups, self.peak_rates):
            group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * progress))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.started is None:
            self.started = time.perf_counter()
            return
        self.images += len(batch[1])
        self.elapsed = time.perf_counter() - self.started
        if self.elapsed >= self.seconds:
            trainer.should_stop = True

    def rate(self) -> float:
        return self.images / self.elapsed if self.elapsed else 0.0


def digits_betons(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _, images, labels = digits_pool("all")
    upscaled = np.stack([np.asarray(Image.fromarray(i, mode="L").resize((32, 32), Image.Resampling.BILINEAR)) for i in images])
    rgb = np.repeat(upscaled[:, :, :, None], 3, axis=3)
    order = np.random.default_rng(0).permutation(len(labels))
    n = len(order)
    cuts = {"train": order[: int(0.7 * n)], "val": order[int(0.7 * n) : int(0.85 * n)], "test": order[int(0.85 * n) :]}
    for split, rows in cuts.items():
        write_beton(folder / f"{split}.beton", rgb[rows], labels[rows])
    return {split: (rgb[rows], labels[rows]) for split, rows in cuts.items()}


def measure(backbone: str, folder: Path, splits: dict, budget_s: float, recipe: str, batch_size: int) -> dict:
    L.seed_everything(0, verbose=False)
    model = ModelConfig(backbone=backbone, num_classes=10, resolution=32)
    augment = RECIPES[recipe]
    # A one-cycle schedule needs its length up front, and the epochs that fit the budget are not
    # known: every backbone gets the same AdamW, its rate annealed over the budget by TrainingBudget.
    module = LitClassifier(
        model.model_dump(mode="json"), OptimConfig(batch_size=batch_size, schedule="constant", learning_rate=3e-3).model_dump(),
        label_smoothing=augment.label_smoothing,
    )
    budget = TrainingBudget(budget_s)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_epochs=10_000, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[budget], use_distributed_sampler=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=FFCVDataModule(folder, batch_size, 2, 0, model.resolution, augment))
    train_wall_s = time.perf_counter() - started
    network = module.net.eval()
    test = TestSet.of_arrays(*splits["test"])
    accuracy = test.accuracy(test.logits(lambda images: predict_torch(network, images))[0])
    exported = folder / backbone
    exported.mkdir()
    report = export_candidate(network, 32, splits["val"][0][:512], test, exported, ExportConfig().policy())
    chosen = next(trial for trial in report.recipe_trials if trial.recipe == report.int8_recipe)
    return {
        "backbone": backbone,
        "parameters_m": round(sum(p.numel() for p in network.parameters()) / 1e6, 2),
        "train_images_per_s": round(budget.rate(), 1),
        "epochs": round(budget.images / len(splits["train"][1]), 1),
        "train_wall_s": round(train_wall_s, 1),
        "test_accuracy": round(accuracy, 4),
        "int8_accuracy": round(report.int8_accuracy, 4),
        "int8_drop_points": round(100 * report.accuracy_drop, 2),
        "int8_latency_ms_batch64": round(chosen.latency_ms_batch64, 2),
        "int8_kib": round(report.int8_bytes / 1024, 1),
        "int8_recipe": report.int8_recipe,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=90.0, help="training seconds per backbone")
    parser.add_argument("--recipe", default="small_images", choices=sorted(RECIPES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flywheel-recipes-") as scratch:
        folder = Path(scratch)
        splits = digits_betons(folder)
        rows = []
        for backbone in args.backbones:
            rows.append(measure(backbone, folder, splits, args.budget, args.recipe, args.batch_size))
            print(f"measured {backbone}", flush=True)

    print(f"\ndigits at 32 px, recipe {args.recipe}, {args.budget:.0f} s of training each, batch {args.batch_size}")
    header = f"{'backbone':20} {'params M':>8} {'train img/s':>11} {'epochs':>6} {'test acc':>8} {'int8 acc':>8} {'drop pt':>7} {'int8 ms/64':>10} {'int8 KiB':>9}"
    print(header)
    for row in rows:
        print(
            f"{row['backbone']:20} {row['parameters_m']:>8} {row['train_images_per_s']:>11} {row['epochs']:>6} "
            f"{row['test_accuracy']:>8.4f} {row['int8_accuracy']:>8.4f} {row['int8_drop_points']:>7} "
            f"{row['int8_latency_ms_batch64']:>10} {row['int8_kib']:>9}"
        )
    print(json.dumps({"budget_s": args.budget, "recipe": args.recipe, "backbones": rows}))


if __name__ == "__main__":
    main()
