"""`flywheel predict` benchmark: scoring image files end to end against ONNX Runtime alone.

Trains the default model on the bundled digits (a few seconds), exports and publishes it as the
champion of a scratch data root the way the loop does, writes N small PNG files, then measures side
by side:
  1. `flywheel predict` on the files (read, decode, preprocess, int8 ONNX Runtime, write the table);
  2. ONNX Runtime alone on the same images already decoded and preprocessed, at the same batch size.
Target: predict >= 0.5x ONNX Runtime alone. Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/predict.py [--images 10000] [--epochs 4]
"""

import argparse
import io
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from flywheel.predict import PREDICT_CHUNK, predict_files
from orchestration.assets.deployment import ExportConfig
from orchestration.assets.evaluation import GateConfig
from orchestration.resources import FlywheelHome
from training.card import GateVerdict, Lineage, build_card
from training.config import AugmentConfig, FitConfig, ModelConfig, OptimConfig
from training.data import write_beton
from training.evaluate import TestSet, evaluate_models
from training.export import export_candidate, export_gate
from training.fit import fit
from training.inference import load_classifier, onnx_session, predict_onnx, predict_torch
from training.registry import WEIGHTS_FILE, Registry
from transforms.classes import DIGITS_CLASSES
from transforms.images import decode_image, served_preprocessing
from transforms.simulate import digits_pool


def publish_champion(home: Path, rgb: np.ndarray, labels: np.ndarray, epochs: int) -> None:
    """Train, export and promote a champion under `home`, through the same functions as the loop."""
    cuts = {"train": slice(0, 1300), "val": slice(1300, 1500), "test": slice(1500, None)}
    betons = home / "ffcv"
    betons.mkdir(parents=True)
    for split, rows in cuts.items():
        write_beton(betons / f"{split}.beton", rgb[rows], labels[rows])
    result = fit(FitConfig(beton_dir=betons, run_dir=home / "run", wandb_save_dir=home, optim=OptimConfig(epochs=epochs)))
    model = ModelConfig()
    network = load_classifier(Path(result.weights_path), model)
    test = TestSet.of_arrays(rgb[cuts["test"]], labels[cuts["test"]])
    registry = Registry(home / "registry")
    staging = registry.staging_dir("bench")
    report = export_candidate(network, model.resolution, rgb[cuts["val"]], test, staging, ExportConfig().policy())
    passed, reasons = export_gate(report, ExportConfig().policy())
    policy = GateConfig().policy()
    evaluation = evaluate_models(test, lambda images: predict_torch(network, images), None, model.num_classes, policy, "fp32")
    served_session = onnx_session(Path(report.int8_path))
    served = evaluate_models(test, lambda images: predict_onnx(served_session, images), None, model.num_classes, policy, "int8")
    (staging / WEIGHTS_FILE).write_bytes(Path(result.weights_path).read_bytes())
    card = build_card(
        model, list(DIGITS_CLASSES), "squash", "grayscale", evaluation.candidate, result.val_accuracy, report,
        ExportConfig().policy(), evaluation_gate=evaluation.gate, export_gate=GateVerdict(passed=passed, reasons=reasons),
        served_ece=served.candidate.ece, served_gate=served.gate, augment=AugmentConfig(), optim=None,
        lineage=Lineage(
            training_batches=["bench"], training_attempt="bench", parent_champion=None, compared_with_champion=None,
            code_version="bench", wandb_run_id="none", dagster_run_id="bench", inputs_fingerprint="bench",
        ),
    )
    registry.promote(registry.publish(staging, card).version, "bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    _, images, labels = digits_pool("all")
    gray32 = np.stack([np.asarray(Image.fromarray(i, mode="L").resize((32, 32), Image.Resampling.BILINEAR)) for i in images])
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "flywheel"
        publish_champion(home, np.repeat(gray32[..., None], 3, axis=3), labels, args.epochs)
        flywheel = FlywheelHome(home=str(home))
        card = Registry(flywheel.registry).champion().card()

        files = []
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        for index in tqdm(range(args.images), desc="writing PNGs", leave=False):
            buffer = io.BytesIO()
            Image.fromarray(gray32[index % len(gray32)], mode="L").save(buffer, format="PNG")
            files.append(inputs / f"{index:06d}.png")
            files[-1].write_bytes(buffer.getvalue())

        # Warm both paths (ONNX Runtime's first run, the file cache) before timing.
        predict_files(files[:PREDICT_CHUNK], Path(folder) / "warmup.parquet", flywheel)
        started = time.perf_counter()
        written, problems = predict_files(files, Path(folder) / "predictions.parquet", flywheel)
        predict_seconds = time.perf_counter() - started
        assert written == len(files) and not problems, (written, problems[:3])

        preprocessing = served_preprocessing(card)
        decoded = np.stack([
            preprocessing(decode_image(path.read_bytes(), 10**8, fit_pixels=preprocessing.decode_pixels).pixels) for path in files
        ])
        session = Registry(flywheel.registry).champion().inference_session()
        predict_onnx(session, decoded[:PREDICT_CHUNK], PREDICT_CHUNK)
        started = time.perf_counter()
        predict_onnx(session, decoded, PREDICT_CHUNK)
        onnx_seconds = time.perf_counter() - started

    predict_rate, onnx_rate = len(files) / predict_seconds, len(files) / onnx_seconds
    figures = {
        "images": len(files), "batch_size": PREDICT_CHUNK,
        "predict_images_per_second": round(predict_rate, 1), "onnx_alone_images_per_second": round(onnx_rate, 1),
        "predict_vs_onnx_ratio": round(predict_rate / onnx_rate, 3), "predict_vs_onnx_ratio_target_min": 0.5,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"\n{'path':<44}{'img/s':>10}")
    print(f"{'flywheel predict (files -> table)':<44}{predict_rate:>10,.0f}")
    print(f"{'ONNX Runtime alone (decoded, batch ' + str(PREDICT_CHUNK) + ')':<44}{onnx_rate:>10,.0f}")
    print(f"ratio: {predict_rate / onnx_rate:.2f}x (target >= 0.5)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
