"""When does compiling FFCV's pipeline pay? The evidence for LOADER_COMPILE_MIN_IMAGES.

FFCV compiles a loader's pipeline with numba while building it and at its first batch; nothing of
it is cached across processes, and every training and Dagster step is a fresh process. For each
case below, side by side, the same random images through the same loader, compiled and run as
Python, each in a fresh process (numba keeps what one process compiled):
  - start: seconds from building the loader to the end of its first epoch (compilation included);
  - steady: microseconds per image over the next two epochs;
  - break-even: images a loader must deliver before compiling has paid for itself (none when the
    compiled pipeline is no faster).
Cases: raw 32 px images for evaluation and for training with the digits' augmentation (translate
and cutout); raw 224 px images for evaluation and for training with the photos' augmentation
(random resized crops, flips, colour jitter).
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/loader_compile.py [--workers 2]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    # name: (resolution, images, batch size, train, augmentation)
    "32px evaluation": (32, 4000, 256, False, {}),
    "32px training, translate + cutout": (32, 4000, 256, True, {"translate": 2, "cutout": 4}),
    "224px evaluation": (224, 600, 64, False, {}),
    "224px training, crops + flips + jitter": (
        224, 600, 64, True, {"random_resized_crop": True, "horizontal_flip": True, "color_jitter": 0.4},
    ),
}


def one(case: str, compiled: bool, workers: int) -> dict:
    """Measured in this process: the loader of `case`, compiled or not."""
    import numpy as np
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder

    from training.config import AugmentConfig
    from training.data import make_loader, write_beton

    resolution, count, batch_size, train, augment = CASES[case]
    augment = AugmentConfig(**augment)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = write_beton(
            Path(folder) / "images.beton",
            rng.integers(0, 256, (count, resolution, resolution, 3), dtype=np.uint8), rng.integers(0, 10, count),
        )
        decoder = (
            RandomResizedCropRGBImageDecoder((resolution, resolution), scale=augment.crop_scale)
            if augment.random_resized_crop else None
        )
        started = time.perf_counter()
        loader = make_loader(
            path, batch_size, workers, train=train, augment=augment, decoder=decoder,
            compile_min_images=0 if compiled else count * 10,
        )
        first = sum(len(labels) for _, labels in loader)
        start_s = time.perf_counter() - started
        started = time.perf_counter()
        seen = sum(len(labels) for _ in range(2) for _, labels in loader)
        steady_us = (time.perf_counter() - started) / seen * 1e6
    return {"start_s": start_s, "steady_us_per_image": steady_us, "first_epoch_images": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1] == "compiled", args.workers)))
        return

    results = {}
    for case in CASES:
        results[case] = {}
        for mode in ("compiled", "python"):
            output = subprocess.run(
                [sys.executable, __file__, "--workers", str(args.workers), "--one", case, mode],
                check=True, capture_output=True, text=True,
            ).stdout
            results[case][mode] = json.loads(output.strip().splitlines()[-1])
        compiled, python = results[case]["compiled"], results[case]["python"]
        saved_us = python["steady_us_per_image"] - compiled["steady_us_per_image"]
        extra_s = compiled["start_s"] - python["start_s"]
        results[case]["break_even_images"] = round(extra_s / saved_us * 1e6) if saved_us > 0 else None

    print(f"{'case':42s} {'start s (compiled / python)':>28s} {'steady us/image (compiled / python)':>37s} {'break-even images':>18s}")
    for case, result in results.items():
        compiled, python = result["compiled"], result["python"]
        even = result["break_even_images"]
        print(
            f"{case:42s} {compiled['start_s']:13.2f} / {python['start_s']:<12.2f} "
            f"{compiled['steady_us_per_image']:18.1f} / {python['steady_us_per_image']:<16.1f} "
            f"{even if even is not None else 'never':>18}"
        )
    from training.config import LOADER_COMPILE_MIN_IMAGES

    print(f"loaders are compiled from {LOADER_COMPILE_MIN_IMAGES:,} images on (training.config.LOADER_COMPILE_MIN_IMAGES)")
    print(json.dumps({"workers": args.workers, "compile_min_images": LOADER_COMPILE_MIN_IMAGES, "cases": results}))


if __name__ == "__main__":
    main()
