"""Quantization benchmark: fp32 vs int8 ONNX Runtime on this machine's CPU.

Trains the default model on the bundled digits (a few seconds), exports it the way `exported_model`
does (every int8 recipe tried, the fastest that keeps accuracy kept), then measures side by side:
latency at batch 1 and 64, throughput at batch 64, file size and test accuracy of fp32 and int8,
and the time of that first export (the search) against the next one of the same architecture on this
machine (the remembered recipe alone).
Targets: int8 latency at batch 64 <= 0.7x fp32, int8 file <= 0.3x, accuracy drop <= 1 point.
Prints tables, then one JSON line with the figures.

    .venv/bin/python bench/quantization.py [--epochs 8] [--runs 50]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from orchestration.assets.deployment import ExportConfig
from training.config import FitConfig, ModelConfig, OptimConfig
from training.data import write_beton
from training.inference import load_classifier, onnx_latency_ms, onnx_session
from training.evaluate import TestSet
from training.export import RecipeMemory, export_candidate
from training.fit import fit
from transforms.simulate import digits_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency figure (median)")
    args = parser.parse_args()

    _, images, labels = digits_pool("all")
    rgb = np.repeat(np.stack([np.asarray(Image.fromarray(i, mode="L").resize((32, 32), Image.Resampling.BILINEAR)) for i in images])[..., None], 3, axis=3)
    cuts = {"train": slice(0, 1300), "val": slice(1300, 1500), "test": slice(1500, None)}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for split, rows in cuts.items():
            write_beton(root / f"{split}.beton", rgb[rows], labels[rows])
        result = fit(FitConfig(beton_dir=root, run_dir=root / "run", wandb_save_dir=root, optim=OptimConfig(epochs=args.epochs)))
        network = load_classifier(Path(result.weights_path), ModelConfig())
        test_images, test_labels = rgb[cuts["test"]], labels[cuts["test"]]
        memory = RecipeMemory(root / "int8_recipes.json")
        started = time.perf_counter()
        test = TestSet.of_arrays(test_images, test_labels)
        report = export_candidate(network, 32, rgb[cuts["val"]], test, root, ExportConfig().policy(), memory)
        search_seconds = time.perf_counter() - started
        (root / "again").mkdir()
        started = time.perf_counter()
        again = export_candidate(network, 32, rgb[cuts["val"]], test, root / "again", ExportConfig().policy(), memory)
        remembered_seconds = time.perf_counter() - started
        assert report.int8_recipe_searched and not again.int8_recipe_searched and again.int8_recipe == report.int8_recipe

        figures = {}
        for name, path, accuracy in (("fp32", report.fp32_path, report.fp32_accuracy), ("int8", report.int8_path, report.int8_accuracy)):
            session = onnx_session(Path(path))
            batch1 = onnx_latency_ms(session, test_images, 1, args.runs)
            batch64 = onnx_latency_ms(session, test_images, 64, args.runs)
            figures[name] = {
                "latency_ms_batch1": round(batch1, 3), "latency_ms_batch64": round(batch64, 3),
                "images_per_s_batch64": round(64_000 / batch64), "bytes": Path(path).stat().st_size, "accuracy": round(accuracy, 4),
            }

    fp32, int8 = figures["fp32"], figures["int8"]
    ratios = {
        "int8_vs_fp32_latency_batch64": round(int8["latency_ms_batch64"] / fp32["latency_ms_batch64"], 3),
        "int8_vs_fp32_latency_batch1": round(int8["latency_ms_batch1"] / fp32["latency_ms_batch1"], 3),
        "int8_vs_fp32_size": round(int8["bytes"] / fp32["bytes"], 3),
        "int8_accuracy_drop_points": round(100 * (fp32["accuracy"] - int8["accuracy"]), 2),
        "export_seconds_search": round(search_seconds, 2),
        "export_seconds_remembered": round(remembered_seconds, 2),
        "export_remembered_vs_search": round(remembered_seconds / search_seconds, 3),
    }
    print(f"\nint8 recipes tried (test accuracy, batch-64 latency; fp32 accuracy {report.fp32_accuracy:.4f}):")
    for trial in sorted(report.recipe_trials, key=lambda t: t.latency_ms_batch64):
        chosen = "  <- kept" if trial.recipe == report.int8_recipe else ""
        gate = "ok" if trial.passed_accuracy_gate else "too inaccurate"
        print(f"  {trial.recipe:<40}{trial.accuracy:>8.4f}{trial.latency_ms_batch64:>10.2f} ms  {trial.bytes / 1024:>7.1f} KiB  {gate}{chosen}")
    print(f"\n{'model':<8}{'batch 1':>12}{'batch 64':>12}{'img/s @64':>12}{'size':>12}{'accuracy':>10}")
    for name, f in figures.items():
        print(f"{name:<8}{f['latency_ms_batch1']:>10.3f}ms{f['latency_ms_batch64']:>10.2f}ms{f['images_per_s_batch64']:>12,}{f['bytes'] / 1024:>9.1f}KiB{f['accuracy']:>10.4f}")
    print(f"\nint8 / fp32 latency at batch 64: {ratios['int8_vs_fp32_latency_batch64']:.2f}x (target <= 0.7, never > 1)")
    print(f"int8 / fp32 size: {ratios['int8_vs_fp32_size']:.2f}x (target <= 0.3)")
    print(f"accuracy drop: {ratios['int8_accuracy_drop_points']:.2f} points (target <= 1)")
    print(f"export with the recipe search: {search_seconds:.1f} s; the next export of this architecture on this machine "
          f"(remembered recipe): {remembered_seconds:.1f} s ({ratios['export_remembered_vs_search']:.2f}x)")
    print(json.dumps({"fp32": fp32, "int8": int8, **ratios, "int8_recipe": report.int8_recipe, "runs": args.runs,
                      "targets": {"latency_batch64_max": 0.7, "size_max": 0.3, "accuracy_drop_points_max": 1.0}}))


if __name__ == "__main__":
    main()
