"""Does a retraining's cost follow the new data? Full and incremental retraining side by side.

Builds per-batch FFCV shards with the product's `build_datasets` (each batch split 70/15/15 into
train/val/test): `--history` batches of the digits (each copy shifted and grained differently, so no
two batches are alike) and one new batch that drifted (inverted polarity, digits no history batch
holds). Then, each training its own process as the `trained_model` asset launches it
(`python -m training.fit`: imports, FFCV's compilation and all):

  full, 1 batch of history      the retraining of a young project: every example, the full recipe
  champion                      full on the history alone: what the incremental retraining starts from
  full, N batches of history    every example of the history and the new batch
  incremental, N                the champion fine-tuned on the new batch and a class-balanced replay
                                sample (`training.replay`, trained_model's incremental_* defaults)

and compares the two N-batch candidates on the test split: overall, per batch, and the gate's own
per-slice test (exact McNemar per batch and class, Holm-adjusted) of incremental against full.
The four trainings run once per training seed (`--seeds`) on the same shards: one run's figures move
by about as much as the targets allow, so the targets are judged on the seeds' mean.
Prints a table, then one JSON line.

    .venv/bin/python bench/incremental.py [--history 20] [--batch-size 150] [--epochs 16] [--test-size 200] [--distillation 0.5] [--seeds 3]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from orchestration.assets.evaluation import GateConfig
from orchestration.assets.training import TrainingConfig
from training.config import ModelConfig, OptimConfig
from training.data import build_datasets, read_beton
from training.gate import compare_slices
from training.inference import load_classifier, predict_torch
from training.replay import replay_selection
from transforms.simulate import digits_pool
from transforms.warehouse import Records

from fit_process import train  # bench/, beside this script

RESOLUTION = 32


def batch_images(pool: str, size: int, seed: int, invert: bool) -> tuple[np.ndarray, np.ndarray]:
    """`size` digits of `pool` at 32 px RGB, each shifted by up to 2 px with grain, seeded per batch."""
    _, images, labels = digits_pool(pool)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(labels), size, replace=size > len(labels))
    out = np.empty((size, RESOLUTION, RESOLUTION, 3), np.uint8)
    for row, pick in enumerate(picks):
        image = np.asarray(Image.fromarray(images[pick], mode="L").resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR), np.float32)
        image = np.roll(image, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) + rng.normal(0, 6, image.shape)
        image = np.clip(255 - image if invert else image, 0, 255).astype(np.uint8)
        out[row] = image[:, :, None]
    return out, labels[picks]


def build(folder: Path, history: int, batch_size: int, test_size: int = 0) -> dict:
    """Per-batch shards and split files of `history` clean batches and one drifted batch. Each batch's
    test split gets `test_size` more images of the same kind beyond its 15%: a gap of 1 point between
    two models is 5 images of 483, well within chance, and 20 of the new batch's 23 test images."""
    batches = {f"hist-{n:03d}": ("main", n, False) for n in range(history)} | {"new-000": ("holdout", 1000, True)}
    splits = {}
    for batch_id, (pool, seed, invert) in batches.items():
        images, labels = batch_images(pool, batch_size, seed, invert)
        cut = np.random.default_rng(seed).permutation(batch_size)
        train_end, val_end = int(0.7 * batch_size), int(0.85 * batch_size)
        for split, rows in (("train", cut[:train_end]), ("val", cut[train_end:val_end]), ("test", cut[val_end:])):
            rows = np.sort(rows)
            split_images, split_labels = images[rows], labels[rows]
            if split == "test" and test_size:
                more_images, more_labels = batch_images(pool, test_size, seed + 100_000, invert)
                split_images, split_labels = np.concatenate([split_images, more_images]), np.concatenate([split_labels, more_labels])
            ids = [f"{batch_id}-{r}" for r in range(len(split_labels))] if split == "test" else [f"{batch_id}-{r}" for r in rows]
            index = pl.DataFrame({"image_id": ids, "batch_id": batch_id, "label": split_labels})
            splits[(split, batch_id)] = Records(split_images, index)
    digests = {key: f"{key[1]}-{len(shard.labels)}" for key, shard in splits.items()}
    return build_datasets(folder, "bench", digests, lambda split, batch_id: splits[(split, batch_id)]).manifest


def compare(root: Path, young: dict, grown: dict, args: argparse.Namespace, optim: OptimConfig, fine_tune: OptimConfig,
            incremental, seed: int) -> dict:
    """The four trainings with training seed `seed` on the same shards, and the two N-batch candidates compared."""
    optim, fine_tune = optim.model_copy(update={"seed": seed}), fine_tune.model_copy(update={"seed": seed})
    root = root / f"seed-{seed}"
    # The champion: the history alone (the new batch's rows left out of its training).
    train_index = pl.read_parquet(grown["train"]["index"])
    history_rows = np.flatnonzero((train_index["batch_id"] != "new-000").to_numpy()).astype(np.uint64)
    full_n, incremental_n = f"full, {args.history} batches", f"incremental, {args.history} batches"
    model = ModelConfig(num_classes=10, resolution=RESOLUTION)
    runs = {
        "full, 1 batch of history": train("full-1", root.parent / "young", root, model, optim),
        "champion (history only)": train("champion", root.parent / "grown", root, model, optim, rows=history_rows),
    }
    runs[full_n] = train("full-n", root.parent / "grown", root, model, optim)
    selection = replay_selection(Path(grown["train"]["index"]), ["new-000"], incremental.replay_ratio, seed, incremental.new_passes)
    runs[incremental_n] = train(
        "incremental-n", root.parent / "grown", root, model, fine_tune, warm_start=Path(runs["champion (history only)"]["weights_path"]),
        rows=selection.indices,
    )

    images, labels = read_beton(root.parent / "grown" / "test.beton")
    batches = pl.read_parquet(grown["test"]["index"])["batch_id"].to_numpy()
    predictions = {
        mode: predict_torch(load_classifier(Path(runs[name]["weights_path"]), model), images).argmax(axis=1)
        for mode, name in (("full", full_n), ("incremental", incremental_n))
    }
    correct = {mode: predictions[mode] == labels for mode in predictions}
    slices = compare_slices(labels, batches, predictions["incremental"], predictions["full"], GateConfig().policy())
    examples = {"full, 1 batch of history": young["train"]["examples"], "champion (history only)": len(history_rows),
                full_n: grown["train"]["examples"], incremental_n: len(selection.indices)}
    per_batch = pl.DataFrame({"batch": batches, "full": correct["full"], "incremental": correct["incremental"]}).group_by("batch").agg(
        pl.len().alias("test images"), pl.col("full").mean().round(3), pl.col("incremental").mean().round(3),
    ).sort("batch")
    overall = {mode: round(float(c.mean()), 4) for mode, c in correct.items()}
    baseline = runs["full, 1 batch of history"]["seconds"]
    return {
        "seed": seed, "test_images": len(labels),
        "trainings": [
            {"seed": seed, "training": name, "examples": examples[name], "epochs": r["epochs_completed"], "wall s": r["seconds"],
             "train s": r["train_seconds"], "val acc": round(r["val_accuracy"], 4)}
            for name, r in runs.items()
        ],
        "per_batch": per_batch,
        "seconds": {name: r["seconds"] for name, r in runs.items()},
        "incremental_vs_full_1_history": round(runs[incremental_n]["seconds"] / baseline, 3),
        "full_vs_full_1_history": round(runs[full_n]["seconds"] / baseline, 3),
        "incremental_examples": len(selection.indices), "replay_examples": selection.replay_examples, "new_passes": selection.new_passes,
        "accuracy": overall, "accuracy_gap": round(overall["full"] - overall["incremental"], 4),
        "regressed_slices": [s.slice for s in slices if s.regressed],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=20, help="batches of history")
    parser.add_argument("--batch-size", type=int, default=150, help="images per batch")
    parser.add_argument("--epochs", type=int, default=OptimConfig().epochs, help="epochs of a full retraining")
    parser.add_argument("--test-size", type=int, default=200, help="test images per batch beyond its 15%% split")
    parser.add_argument("--distillation", type=float, default=None, help="incremental_distillation (default: trained_model's)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds; the decision is on their mean")
    args = parser.parse_args()
    settings = TrainingConfig(epochs=args.epochs, **({} if args.distillation is None else {"incremental_distillation": args.distillation}))
    incremental = settings.incremental()
    optim = settings.optim()
    fine_tune = incremental.fine_tune(optim)

    with tempfile.TemporaryDirectory(prefix="flywheel-incremental-") as tmp:
        root = Path(tmp)
        young, grown = build(root / "young", 1, args.batch_size), build(root / "grown", args.history, args.batch_size, args.test_size)
        results = [compare(root, young, grown, args, optim, fine_tune, incremental, optim.seed + n) for n in range(args.seeds)]

    with pl.Config(tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_rows=-1, fmt_str_lengths=40):
        print(pl.DataFrame([row for result in results for row in result["trainings"]]))
        print(pl.concat([result["per_batch"].with_columns(seed=pl.lit(result["seed"])) for result in results]).group_by("batch").agg(
            pl.col("test images").first(), pl.col("full").mean().round(3), pl.col("incremental").mean().round(3),
            pl.col("full").min().alias("full min"), pl.col("incremental").min().alias("incremental min"),
        ).sort("batch"))
    mean = {key: round(float(np.mean([r[key] for r in results])), 4)
            for key in ("incremental_vs_full_1_history", "full_vs_full_1_history", "accuracy_gap")}
    for result in results:
        print(f"seed {result['seed']}: incremental {result['incremental_vs_full_1_history']:.2f}x the time of a full retraining with 1, "
              f"full {result['full_vs_full_1_history']:.2f}x; test accuracy full {result['accuracy']['full']:.4f}, "
              f"incremental {result['accuracy']['incremental']:.4f} on {result['test_images']} images; slices significantly worse "
              f"(gate's McNemar + Holm): {', '.join(result['regressed_slices']) or 'none'}")
    print(f"mean of {len(results)} seeds: incremental {mean['incremental_vs_full_1_history']:.2f}x (target <= 1.5x), "
          f"full {mean['full_vs_full_1_history']:.2f}x; incremental {100 * mean['accuracy_gap']:.2f} points behind full (target <= 1)")
    print(json.dumps({
        "history_batches": args.history, "batch_size": args.batch_size, "test_images": results[0]["test_images"],
        "distillation": incremental.distillation, "seeds": [r["seed"] for r in results], "mean": mean,
        "runs": [{key: value for key, value in r.items() if key not in ("trainings", "per_batch")}
                 | {"per_batch": {row["batch"]: {"full": row["full"], "incremental": row["incremental"]} for row in r["per_batch"].to_dicts()}}
                 for r in results],
    }))


if __name__ == "__main__":
    main()
