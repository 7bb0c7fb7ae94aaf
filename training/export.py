"""Export to the ONNX contract (uint8 `image` [N, H, W, 3] -> float32 `logits` [N, classes]) and int8
quantization with ONNX Runtime, calibrated on the validation split.

Which int8 recipe is fastest while keeping accuracy depends on the network's architecture and on the
CPU and ONNX Runtime that serve it, not on the weights: the search over every recipe runs once per
architecture and machine (`RecipeMemory`), and later exports quantize with the remembered winner
only, searching again when it no longer keeps the accuracy."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from training.evaluate import TestSet
from training.gate import paired_difference_bounds
from training.inference import forward_batch, onnx_latency_ms, onnx_session, predict_onnx, predict_torch
from training.backbones import Classifier
from training.results import ExportGatePolicy, ExportReport, Int8Drop, RecipeTrial

ONNX_OPSET = 18


def export_fp32(network: Classifier, resolution: int, path: Path) -> Path:
    """torch -> ONNX with the dynamo exporter, a dynamic batch dimension, written atomically."""
    network = network.eval()
    example = torch.zeros((2, resolution, resolution, 3), dtype=torch.uint8)
    partial = path.with_name(f".{path.name}.partial")
    program = torch.onnx.export(
        network,
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=65536)}},
        opset_version=ONNX_OPSET,
        verbose=False,
    )
    program.save(str(partial))
    _strip_debug_info(partial)
    onnx.checker.check_model(str(partial))
    os.replace(partial, path)
    return path


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node stack traces and intermediate shapes: on a small model they
    are a third of the file, and no runtime reads them."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    onnx.save(model, str(path))


class _ArrayCalibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray):
        batch_size = forward_batch(images)
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


@dataclass(frozen=True)
class QuantizationRecipe:
    quant_format: QuantFormat = QuantFormat.QOperator
    activation_type: QuantType = QuantType.QUInt8
    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = True
    reduce_range: bool = False

    @property
    def name(self) -> str:
        short = {QuantType.QInt8: "S8", QuantType.QUInt8: "U8"}
        return (
            f"{self.quant_format.name}-{short[self.activation_type]}{short[self.weight_type]}"
            f"-{'per_channel' if self.per_channel else 'per_tensor'}{'-reduce_range' if self.reduce_range else ''}"
        )


# The formats that matter on x86 CPUs: QDQ and QOperator graphs; activations x weights as U8S8 (the
# VNNI fast path), S8S8 and U8U8; per-channel or per-tensor weights. reduce_range (7-bit weights)
# only helps CPUs without VNNI and costs accuracy, so it is offered once, on the usual U8S8 path.
CANDIDATE_RECIPES = tuple(
    QuantizationRecipe(quant_format, activations, weights, per_channel)
    for quant_format in (QuantFormat.QOperator, QuantFormat.QDQ)
    for activations, weights in (
        (QuantType.QUInt8, QuantType.QInt8), (QuantType.QInt8, QuantType.QInt8), (QuantType.QUInt8, QuantType.QUInt8)
    )
    for per_channel in (True, False)
) + (QuantizationRecipe(QuantFormat.QOperator, QuantType.QUInt8, QuantType.QInt8, True, reduce_range=True),)


# The calibration sample costs time, not memory: ONNX Runtime's MinMax calibrator reduces each tensor
# to its min and max inside the graph (ReduceMin/ReduceMax outputs), a forward batch at a time
# (measured, ONNX Runtime 1.32: 128, 512 and 2,048 images at 64 px peak alike, ~0.8 GB above the
# imports; ResNet-18 at 224 px ~0.4 GB). Each image is a forward pass per recipe tried, 13 in a search
# (~0.1 s per image at 224 px through ResNet-18 on two cores), so the sample is bounded in pixels:
# 512 images up to 78 px, 62 at 224 px.
CALIBRATION_PIXELS = 3 * 2**20
# The recipes are scored on the same test images. Each pass over the split file starts an FFCV loader
# (~1.5 s, mostly threads and the pipeline, for a few hundred digits), so a split this small is read
# once into memory (64 MiB: ~20k images at 32 px, ~440 at 224 px); a bigger one is streamed per recipe.
SEARCH_TEST_BYTES = 64 * 2**20
# How many remembered recipes an export tries before searching them all again: when the first few all
# lose accuracy, the weights have changed enough that the ranking no longer says much.
REMEMBERED_TRIES = 3


def calibration_size(requested: int, resolution: int) -> int:
    """How many calibration images to use: the requested number, within CALIBRATION_PIXELS."""
    return max(1, min(requested, CALIBRATION_PIXELS // (resolution * resolution)))


def calibration_indices(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of at most `size` calibration examples, balanced over the classes (each class
    in turn, in a seeded random order), so a rare class still sets its activation ranges and the
    calibrator, which keeps the activations of every image it sees, stays within bounds whatever the
    size of the split. Chosen from the labels alone: only the chosen images are read."""
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    interleaved = [members[rank] for rank in range(max(map(len, by_class))) for members in by_class if rank < len(members)]
    return np.sort(np.array(interleaved[:size]))


RECIPES_BY_NAME = {recipe.name: recipe for recipe in CANDIDATE_RECIPES}
# CPU features that decide which int8 kernels ONNX Runtime runs (VNNI/AMX: the U8S8 fast paths).
INT8_CPU_FLAGS = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


def architecture_signature(fp32_path: Path) -> dict:
    """The network's graph without its weights: operators in order and the shapes of its tensors."""
    graph = onnx.load(str(fp32_path)).graph
    return {
        "operators": [node.op_type for node in graph.node],
        "initializers": sorted([initializer.name, list(initializer.dims)] for initializer in graph.initializer),
    }


def machine_signature() -> dict:
    """What makes a recipe faster on one machine than another: the CPU, its int8 instructions and ORT."""
    import onnxruntime

    cpu, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not cpu:
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "machine": platform.machine(), "int8_instructions": sorted(flags & INT8_CPU_FLAGS),
        "onnxruntime": onnxruntime.__version__,
    }


class RecipeMemory:
    """The int8 recipes an export search found to keep accuracy, fastest first, per architecture and
    machine, in a JSON file beside the exports (`$FLYWHEEL_HOME/export/int8_recipes.json`), written
    whole and renamed into place. The whole ranking is kept: the fastest recipe is often the one at the
    edge of the accuracy limit (7-bit weights), and new weights can tip it over; the next one is then
    tried instead of searching all of them again."""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def key(fp32_path: Path) -> str:
        signature = {"architecture": architecture_signature(fp32_path), "machine": machine_signature()}
        return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]

    def _entries(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: the search runs and writes a good file

    def recall(self, key: str) -> list[QuantizationRecipe]:
        entry = self._entries().get(key)
        if not isinstance(entry, dict):
            return []
        names = entry.get("ranking") or [entry.get("recipe")]  # files of earlier versions kept one recipe
        return [RECIPES_BY_NAME[name] for name in names if name in RECIPES_BY_NAME]

    def remember(self, key: str, ranking: list[str]) -> None:
        entries = self._entries()
        entries[key] = {"ranking": ranking, "machine": machine_signature(), "searched_at": datetime.now(timezone.utc).isoformat()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(entries, indent=2, sort_keys=True))
        os.replace(partial, self.path)


class _UintInputNotice(logging.Filter):
    """ORT's quantizer warns, on the root logger, that the uint8 `image` input cannot be quantized.
    It is uint8 by contract and meant to stay so; every other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Inference failed or unsupported type to quantize for tensor 'image'")


def quantize_int8(fp32_path: Path, calibration_images: np.ndarray, path: Path,
                  recipe: QuantizationRecipe = QuantizationRecipe()) -> Path:
    prepared = path.with_name(f".{path.name}.prepared.onnx")
    partial = path.with_name(f".{path.name}.partial")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    notice = _UintInputNotice()
    logging.getLogger().addFilter(notice)
    try:
        quantize_static(
            str(prepared),
            str(partial),
            _ArrayCalibration(calibration_images),
            quant_format=recipe.quant_format,
            activation_type=recipe.activation_type,
            weight_type=recipe.weight_type,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
        )
    finally:
        logging.getLogger().removeFilter(notice)
        prepared.unlink(missing_ok=True)
    _strip_debug_info(partial)
    os.replace(partial, path)
    return path


def measure_drop(labels: np.ndarray, fp32_predictions: np.ndarray, int8_predictions: np.ndarray, level: float) -> Int8Drop:
    """int8 against fp32, paired on the same test images, with the promotion gate's bootstrap bound.
    On a small test set one flipped image is more than a point, noise rather than a broken recipe:
    the export gate refuses int8 only when it loses significantly more than its limit (what users
    get is also judged against the champion's int8 file by the served-model gate)."""
    fp32_right, int8_right = fp32_predictions == labels, int8_predictions == labels
    only_fp32, only_int8 = int((fp32_right & ~int8_right).sum()), int((int8_right & ~fp32_right).sum())
    lower, _, _ = paired_difference_bounds(only_fp32, only_int8, len(labels), level)
    return Int8Drop(len(labels), only_fp32, only_int8, lower)


def _trial(
    fp32_path: Path, calibration_images: np.ndarray, test: TestSet, timing_images: np.ndarray,
    recipe: QuantizationRecipe, fp32_predictions: np.ndarray, policy: ExportGatePolicy, path: Path,
) -> tuple[RecipeTrial, Path]:
    candidate = path.with_name(f".{path.stem}.{recipe.name}.onnx")
    quantize_int8(fp32_path, calibration_images, candidate, recipe)
    session = onnx_session(candidate)
    (logits,) = test.logits(lambda images: predict_onnx(session, images))
    drop = measure_drop(test.labels, fp32_predictions, logits.argmax(axis=1), policy.level)
    size = candidate.stat().st_size
    trial = RecipeTrial(
        recipe.name, test.accuracy(logits), onnx_latency_ms(session, timing_images, batch_size=64, runs=5),
        size, drop.within(policy.max_accuracy_drop), size <= policy.max_size_ratio * fp32_path.stat().st_size, drop,
    )
    return trial, candidate


def _preference(policy: ExportGatePolicy) -> Callable[[RecipeTrial], tuple[bool, float]]:
    """Among acceptable recipes: those whose measured drop is within the limit first, then the fastest."""
    return lambda trial: (trial.drop is not None and trial.drop.drop > policy.max_accuracy_drop + 1e-9, trial.latency_ms_batch64)


def choose_int8(
    fp32_path: Path, calibration_images: np.ndarray, test: TestSet, fp32_predictions: np.ndarray,
    policy: ExportGatePolicy, path: Path, recipes: tuple[QuantizationRecipe, ...] = CANDIDATE_RECIPES,
    remembered: list[QuantizationRecipe] | None = None,
) -> tuple[RecipeTrial, list[RecipeTrial], bool]:
    """Keep, at `path`, the fastest int8 recipe (batch 64, on this machine) that the export gate's
    accuracy and size limits accept (`Int8Drop`; per-channel scales make a small network's file
    relatively larger), preferring those whose measured drop is within the limit: the first of the
    `remembered` ranking that is acceptable (of its first REMEMBERED_TRIES), else the best of a search
    over every recipe. Returns (the chosen trial, all trials, whether it searched)."""
    timing_images = test.first_images(64)
    if timing_images[0].nbytes * len(test.labels) <= SEARCH_TEST_BYTES:
        test = test.in_memory()
    arguments = (fp32_path, calibration_images, test, timing_images)
    limits = (fp32_predictions, policy, path)
    tried = []
    for recipe in (remembered or [])[:REMEMBERED_TRIES]:
        trial, candidate = _trial(*arguments, recipe, *limits)
        tried.append(trial)
        if trial.acceptable:
            os.replace(candidate, path)
            return trial, tried, False
        candidate.unlink(missing_ok=True)
    results = [_trial(*arguments, recipe, *limits) for recipe in recipes]
    passing = [result for result in results if result[0].acceptable]
    preference = _preference(policy)
    # When no recipe passes both limits, the most accurate is kept and the export gate says no.
    chosen, chosen_path = (
        min(passing, key=lambda r: preference(r[0])) if passing
        else max(results, key=lambda r: (r[0].passed_accuracy_gate, r[0].accuracy, -r[0].bytes))
    )
    os.replace(chosen_path, path)
    for _, other in results:
        other.unlink(missing_ok=True)
    return chosen, [trial for trial, _ in results], True


def passing_ranking(trials: list[RecipeTrial], policy: ExportGatePolicy) -> list[str]:
    """The acceptable recipes in the search's order of preference: what the next export tries, in order."""
    return [trial.recipe for trial in sorted(trials, key=_preference(policy)) if trial.acceptable]


def export_candidate(
    network: Classifier, resolution: int, calibration_images: np.ndarray, test: TestSet,
    directory: Path, policy: ExportGatePolicy, recipe_memory: RecipeMemory | None = None,
) -> ExportReport:
    """fp32 ONNX and the fastest int8 recipe the export gate's limits accept, in `directory`, with
    parity (the largest |torch logit - ONNX logit| on the test images), the test accuracy of each
    file and int8's paired drop against fp32. With `recipe_memory`, the search runs once per
    architecture and machine."""
    fp32 = export_fp32(network, resolution, directory / "model.onnx")
    fp32_session = onnx_session(fp32)
    torch_logits, fp32_logits = test.logits(lambda images: predict_torch(network, images), lambda images: predict_onnx(fp32_session, images))
    fp32_accuracy = test.accuracy(fp32_logits)
    fp32_predictions = fp32_logits.argmax(axis=1)
    key = recipe_memory.key(fp32) if recipe_memory else ""
    chosen, trials, searched = choose_int8(
        fp32, calibration_images, test, fp32_predictions, policy, directory / "model.int8.onnx",
        remembered=recipe_memory.recall(key) if recipe_memory else None,
    )
    if recipe_memory and searched and chosen.acceptable:
        recipe_memory.remember(key, passing_ranking(trials, policy))
    int8 = directory / "model.int8.onnx"
    return ExportReport(
        fp32_path=str(fp32),
        int8_path=str(int8),
        fp32_bytes=fp32.stat().st_size,
        int8_bytes=int8.stat().st_size,
        parity_max_abs_diff=float(np.abs(torch_logits - fp32_logits).max()),
        fp32_accuracy=fp32_accuracy,
        int8_accuracy=chosen.accuracy,
        int8_recipe=chosen.recipe,
        recipe_trials=trials,
        int8_recipe_searched=searched,
        int8_drop=chosen.drop,
    )


def export_gate(report: ExportReport, policy: ExportGatePolicy) -> tuple[bool, list[str]]:
    drop = report.int8_drop
    drop_ok = drop is not None and drop.within(policy.max_accuracy_drop)
    drop_text = f"int8 accuracy {report.int8_accuracy:.4f} vs fp32 {report.fp32_accuracy:.4f}"
    if drop is not None:
        drop_text += (
            f" on {drop.examples} test images: drop {100 * drop.drop:.2f} points (only fp32 right on {drop.only_fp32_right}, "
            f"only int8 on {drop.only_int8_right}); one-sided {100 * (1 - policy.level):.0f}% lower bound "
            f"{100 * drop.lower_bound:.2f} points " + ("<=" if drop_ok else ">") + f" limit {100 * policy.max_accuracy_drop:.2f}"
            + ("" if drop_ok else ": it loses significantly more")
        )
    checks = [
        (report.parity_max_abs_diff <= policy.max_parity_diff,
         f"fp32 parity: max |logit diff| {report.parity_max_abs_diff:.2e} (limit {policy.max_parity_diff:.0e})"),
        (drop_ok, drop_text),
        (report.size_ratio <= policy.max_size_ratio,
         f"int8 size {report.int8_bytes} B = {report.size_ratio:.3f}x fp32 (limit {policy.max_size_ratio}x)"),
    ]
    return all(ok for ok, _ in checks), [("ok: " if ok else "FAILED: ") + text for ok, text in checks]
