"""Accuracy before labels: the champion's accuracy estimated from its calibrated confidences against
the accuracy the labels show, batch by batch, on clean batches and on every kind of simulated drift.

A champion is trained by the product itself (`flywheel simulate` of the digits' first 720 images, then
`flywheel run` in a fresh data root: the export fits the served int8 model's temperature on the
validation split and writes it to the card). The batches are digits that champion never saw (the
rest of the main pool and the holdout pool): clean ones, and each `flywheel simulate` drift kind at
two strengths. For each batch the drift report's estimate (`training.calibration.estimate_accuracy`,
the card's temperature, the int8 model's logits) is compared with the real accuracy.
Targets on clean batches: mean absolute error <= 3 points, the 95% interval covering the real
accuracy in >= 80% of batches. Drifted batches are reported as they come: under covariate shift a
model's confidence does not fall with its accuracy, which is why the drift report shows the estimate
beside the drift tests, not instead of them.
Prints a table, then one JSON line.

    .venv/bin/python bench/estimate.py [--clean-size 50] [--drift-size 100]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from training.calibration import estimate_accuracy, estimate_error
from training.registry import Registry
from transforms.images import decode_image, served_preprocessing
from transforms.simulate import DRIFT_KINDS, SimulationSpec, digits_pool, simulate_batches

TRAINED_IMAGES = 720  # the first images of the main pool; the champion never sees the rest


def flywheel(home: Path, *args: str) -> None:
    environment = os.environ | {"FLYWHEEL_HOME": str(home), "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env=environment, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench/estimate.py: flywheel {' '.join(args)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def unseen_batches(folder: Path, kind: str, strength: float, size: int, seed: int) -> list[Path]:
    """Batches of `size` digits the champion never saw, with drift `kind` at `strength`: the main pool
    after the trained images, then the holdout pool."""
    main_left = len(digits_pool("main")[0]) - TRAINED_IMAGES
    written = []
    for pool, offset, available in (("main", TRAINED_IMAGES, main_left), ("holdout", 0, len(digits_pool("holdout")[0]))):
        paths, _ = simulate_batches(folder, SimulationSpec(
            batches=available // size, batch_size=size, pool=pool, offset=offset, drift=kind, strength=strength,
            seed=seed, prefix=f"{kind}-{int(100 * strength)}-{pool}",
        ))
        written += paths
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clean-size", type=int, default=50, help="images per clean batch")
    parser.add_argument("--drift-size", type=int, default=100, help="images per drifted batch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flywheel-estimate-") as tmp:
        home = Path(tmp) / "home"
        flywheel(home, "simulate", "--batches", "3", "--size", str(TRAINED_IMAGES // 3))
        flywheel(home, "run")
        champion = Registry(home / "registry").champion()
        card = champion.card()
        session, preprocessing = champion.inference_session(), served_preprocessing(card)
        cases = [("none", 1.0, args.clean_size)] + [
            (kind, strength, args.drift_size) for kind in DRIFT_KINDS if kind != "none" for strength in (0.5, 1.0)
        ]
        rows = []
        for number, (kind, strength, size) in enumerate(cases):
            for path in unseen_batches(Path(tmp) / "batches", kind, strength, size, seed=100 + number):
                frame = pl.read_parquet(path)
                images = np.stack([preprocessing(decode_image(data, 10**6, fit_pixels=preprocessing.decode_pixels).pixels)
                                   for data in frame["image"]])
                logits = session.run(["logits"], {"image": images})[0]
                labels = frame["label"].to_numpy()
                check = estimate_error(estimate_accuracy(logits, card.calibration), float((logits.argmax(axis=1) == labels).mean()))
                rows.append({"drift": kind, "strength": strength, "batch": path.stem, **check})

    table = pl.DataFrame(rows)
    summary = table.group_by("drift", "strength", maintain_order=True).agg(
        pl.len().alias("batches"), pl.col("images").first().alias("images/batch"),
        pl.col("real").mean().round(3).alias("real acc"), pl.col("estimated").mean().round(3).alias("estimated"),
        (100 * pl.col("error").abs().mean()).round(2).alias("MAE pts"), (100 * pl.col("error").mean()).round(2).alias("bias pts"),
        (100 * pl.col("covered").mean()).round(1).alias("covered %"),
    )
    with pl.Config(tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True, tbl_rows=-1):
        print(f"champion {champion.version}: int8 test accuracy {card.metrics.test_accuracy_int8:.4f}; temperature "
              f"{card.calibration.temperature:.3f} on {card.calibration.validation_images} validation images "
              f"(ECE {card.calibration.ece_before:.4f} -> {card.calibration.ece_after:.4f})")
        print(summary)
    clean = summary.filter(pl.col("drift") == "none").row(0, named=True)
    print(f"clean batches: mean absolute error {clean['MAE pts']:.2f} points (target <= 3), interval covers the real accuracy "
          f"in {clean['covered %']:.0f}% of {clean['batches']} batches (target >= 80%)")
    print(json.dumps({
        "champion": champion.version, "temperature": card.calibration.temperature,
        "validation_images": card.calibration.validation_images, "test_accuracy_int8": card.metrics.test_accuracy_int8,
        "clean": {"batches": clean["batches"], "mae_points": clean["MAE pts"], "covered_percent": clean["covered %"]},
        "cases": summary.to_dicts(),
    }))


if __name__ == "__main__":
    main()
