"""Is the labeling queue worth its labels? The queue's picks against random picks at equal label budgets.

Per seed: a champion trained on a small labeled start (300 clean digits of the main pool, 240 to train
on, 60 to validate); the rest of the main pool, rotated by 0.5-1 x `--strength` x 90 degrees (0.3:
13-27 degrees, where the champion is right about three times in four; 0.7, 31-63 degrees, is a new
domain where it is right one time in five), is the unlabeled pool; the holdout pool, rotated the same way, gives 100 validation and 260
test images. For each budget, `training.active.select_for_labeling` (the labeling queue's pick: the
champion's temperature-scaled margins, balanced over predicted classes, farthest-first in its
embedding space) and a uniform random pick each label that many pool images; the retraining the loop
runs for a drifted batch (`--retraining incremental`: the champion fine-tuned on the new labels and a
class-balanced replay of the start, trained_model's incremental defaults; `full`: a new training on the
start plus the labels), its own process as the asset launches it, is scored on the rotated test images.

Label efficiency: the labels random needs to reach an accuracy over the labels the queue needs for the
same (the queue's curve interpolated on log budgets), at the accuracy random reaches with the largest
budget, on the seeds' mean curves; target >= 1.5x. Also the accuracy gained per label over the
champion, queue against random, per budget. Prints a table, then one JSON line.

    .venv/bin/python bench/active.py [--seeds 3] [--budgets 25 50 100] [--strength 0.3] [--retraining incremental|full]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from training.active import queue_for_labeling
from training.calibration import fit_temperature
from orchestration.assets.training import TrainingConfig
from training.config import ModelConfig
from training.data import build_datasets, read_beton
from training.inference import embed_and_predict, load_classifier, predict_torch
from training.replay import replay_selection
from transforms.simulate import digits_pool
from transforms.warehouse import Records

from fit_process import train  # bench/, beside this script

RESOLUTION, START, START_TRAIN, DRIFTED_VAL = 32, 300, 240, 100


def prepare(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """8x8 digits at 32 px RGB, rotated by 0.5-1 x strength x 90 degrees (none at strength 0)."""
    out = np.empty((len(images), RESOLUTION, RESOLUTION, 3), np.uint8)
    for row, image in enumerate(images):
        picture = Image.fromarray(image, mode="L").resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)
        if strength:
            picture = picture.rotate(strength * 90 * rng.uniform(0.5, 1.0), resample=Image.Resampling.BILINEAR)
        out[row] = np.asarray(picture)[:, :, None]
    return out


def build(folder: Path, seed: int, strength: float) -> dict:
    rng = np.random.default_rng(seed)
    _, main_images, main_labels = digits_pool("main")
    _, holdout_images, holdout_labels = digits_pool("holdout")
    order = rng.permutation(len(main_labels))
    start, pool = order[:START], order[START:]
    holdout = rng.permutation(len(holdout_labels))
    parts = {
        ("train", "start"): (prepare(main_images[start[:START_TRAIN]], rng, 0.0), main_labels[start[:START_TRAIN]]),
        ("val", "start"): (prepare(main_images[start[START_TRAIN:]], rng, 0.0), main_labels[start[START_TRAIN:]]),
        ("train", "pool"): (prepare(main_images[pool], rng, strength), main_labels[pool]),
        ("val", "rotated"): (prepare(holdout_images[holdout[:DRIFTED_VAL]], rng, strength), holdout_labels[holdout[:DRIFTED_VAL]]),
        ("test", "rotated"): (prepare(holdout_images[holdout[DRIFTED_VAL:]], rng, strength), holdout_labels[holdout[DRIFTED_VAL:]]),
    }
    shards = {
        key: Records(images, pl.DataFrame({"image_id": [f"{key[1]}-{key[0]}-{n}" for n in range(len(labels))], "batch_id": key[1], "label": labels}))
        for key, (images, labels) in parts.items()
    }
    digests = {key: f"{seed}-{key[1]}-{len(shard.index)}" for key, shard in shards.items()}
    return build_datasets(folder, "bench", digests, lambda split, batch_id: shards[(split, batch_id)]).manifest


def run_seed(root: Path, seed: int, budgets: list[int], strength: float, retraining: str) -> list[dict]:
    folder = root / f"seed-{seed}"
    manifest = build(folder / "data", seed, strength)
    settings = TrainingConfig()
    model, optim = ModelConfig(num_classes=10, resolution=RESOLUTION), settings.optim().model_copy(update={"seed": seed})
    index = pl.read_parquet(manifest["train"]["index"])
    batches = index["batch_id"].to_numpy()
    start_rows, pool_rows = np.flatnonzero(batches == "start"), np.flatnonzero(batches == "pool")
    champion = train("champion", folder / "data", folder, model, optim, rows=start_rows.astype(np.uint64))
    network = load_classifier(Path(champion["weights_path"]), model)

    train_images, train_labels = read_beton(folder / "data" / "train.beton")
    val_images, val_labels = read_beton(folder / "data" / "val.beton")
    test_images, test_labels = read_beton(folder / "data" / "test.beton")
    pool_images = train_images[pool_rows]
    calibration = fit_temperature(predict_torch(network, val_images), val_labels)
    predicted = predict_torch(network, pool_images).argmax(axis=1)

    def queue(budget: int) -> np.ndarray:
        """The labeling queue's pick, as the asset makes it (fp32 here: no export in this benchmark)."""
        selection, _ = queue_for_labeling(
            len(pool_images), lambda rows: pool_images[rows], lambda images: predict_torch(network, images),
            lambda images: embed_and_predict(network, images)[0], calibration.temperature, budget,
        )
        return selection.rows

    def accuracy(weights: str) -> float:
        return float((predict_torch(load_classifier(Path(weights), model), test_images).argmax(axis=1) == test_labels).mean())

    results = [{"seed": seed, "method": "champion", "labels": 0, "accuracy": accuracy(champion["weights_path"]),
                "pool accuracy": float((predicted == train_labels[pool_rows]).mean())}]
    rng = np.random.default_rng(seed + 1000)
    for budget in budgets:
        picks = {
            "queue": queue(budget),
            "random": rng.choice(len(pool_rows), budget, replace=False),
        }
        for method, chosen in picks.items():
            labeled = np.sort(np.concatenate([start_rows, pool_rows[chosen]]))
            if retraining == "full":
                trained = train(f"{method}-{budget}", folder / "data", folder, model, optim, rows=labeled.astype(np.uint64))
            else:  # what the loop runs for a drifted batch: the champion fine-tuned on the new labels and a replay of the start
                incremental = settings.incremental()
                labeled_index = folder / f"{method}-{budget}.index.parquet"
                index[labeled.tolist()].with_columns(
                    pl.Series("batch_id", np.where(np.isin(labeled, pool_rows), "new", "start")),
                ).write_parquet(labeled_index)
                selection = replay_selection(labeled_index, ["new"], incremental.replay_ratio, seed, incremental.new_passes)
                trained = train(
                    f"{method}-{budget}", folder / "data", folder, model, incremental.fine_tune(optim),
                    warm_start=Path(champion["weights_path"]), rows=labeled[selection.indices.astype(np.int64)].astype(np.uint64),
                )
            results.append({
                "seed": seed, "method": method, "labels": budget, "accuracy": accuracy(trained["weights_path"]),
                "pool accuracy": float((predicted[chosen] == train_labels[pool_rows][chosen]).mean()),
                "classes": int(len(np.unique(train_labels[pool_rows][chosen]))),
            })
    return results


def labels_needed(budgets: list[int], accuracies: list[float], target: float) -> float | None:
    """Labels at which the curve reaches `target`, interpolated on log budgets; None if it never does."""
    if accuracies[0] >= target:
        return float(budgets[0])  # at most this many: the curve starts above the target
    for (b0, a0), (b1, a1) in zip(zip(budgets, accuracies), zip(budgets[1:], accuracies[1:])):
        if a0 < target <= a1:
            return float(np.exp(np.log(b0) + (target - a0) / (a1 - a0) * (np.log(b1) - np.log(b0))))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--strength", type=float, default=0.3, help="rotation strength of the drifted pool (0-1)")
    parser.add_argument("--retraining", choices=("incremental", "full"), default="incremental",
                        help="incremental: the champion fine-tuned on the picks and a replay of the start, as the loop "
                        "answers a drifted batch; full: a new training on the start and the picks")
    args = parser.parse_args()
    budgets = sorted(args.budgets)
    with tempfile.TemporaryDirectory(prefix="flywheel-active-") as tmp:
        rows = [row for seed in range(args.seeds) for row in run_seed(Path(tmp), seed, budgets, args.strength, args.retraining)]
    table = pl.DataFrame(rows)
    champion = table.filter(pl.col("method") == "champion").select("seed", pl.col("accuracy").alias("champion"))
    curves = table.filter(pl.col("method") != "champion").join(champion, on="seed").with_columns(
        ((pl.col("accuracy") - pl.col("champion")) / pl.col("labels")).alias("gain per label"),
    )
    mean = curves.group_by("method", "labels").agg(
        pl.col("accuracy").mean(), pl.col("accuracy").min().alias("min"), pl.col("accuracy").max().alias("max"),
        pl.col("gain per label").mean(), pl.col("pool accuracy").mean().alias("champion right on picks"), pl.col("classes").mean(),
    ).sort("method", "labels")
    queue_curve = mean.filter(pl.col("method") == "queue")["accuracy"].to_list()
    random_curve = mean.filter(pl.col("method") == "random")["accuracy"].to_list()
    target = random_curve[-1]
    needed = labels_needed(budgets, queue_curve, target)
    efficiency = budgets[-1] / needed if needed else None
    gain_ratio = [
        (q - c) / (r - c) for q, r, c in zip(queue_curve, random_curve, [champion["champion"].mean()] * len(budgets))
    ]
    with pl.Config(tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_rows=-1, float_precision=4):
        print(f"champion (start of {START_TRAIN} clean digits) on the rotated test images: {champion['champion'].mean():.4f} "
              f"(seeds: {', '.join(f'{a:.3f}' for a in champion['champion'])})")
        print(mean)
    at_least = " (at least: the queue's smallest budget already reaches it)" if needed == budgets[0] else ""
    print(f"label efficiency: random reaches {target:.4f} with {budgets[-1]} labels, the queue with "
          f"{f'{needed:.0f}' if needed else 'none of its budgets'}: "
          f"{f'{efficiency:.2f}x{at_least}' if efficiency else 'n/a'} (target >= 1.5x); accuracy gained per label, queue / random: "
          + ", ".join(f"{b}: {g:.2f}x" for b, g in zip(budgets, gain_ratio)))
    print(json.dumps({
        "seeds": args.seeds, "budgets": budgets, "strength": args.strength, "retraining": args.retraining, "test_images": len(digits_pool("holdout")[2]) - DRIFTED_VAL,
        "champion_accuracy": round(float(champion["champion"].mean()), 4),
        "queue": [round(a, 4) for a in queue_curve], "random": [round(a, 4) for a in random_curve],
        "labels_queue_needs_for_random_at_largest_budget": needed, "label_efficiency": efficiency,
        "gain_per_label_ratio": dict(zip(map(str, budgets), [round(g, 3) for g in gain_ratio])),
        "runs": rows,
    }))


if __name__ == "__main__":
    main()
