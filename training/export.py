"""Export to the ONNX contract (uint8 `image` [N, H, W, 3] -> float32 `logits` [N, classes]) and int8
quantization with ONNX Runtime, calibrated on the validation split."""

from __future__ import annotations

import os
from dataclasses import dataclass
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

from training.evaluate import onnx_session, predict_onnx, predict_torch
from training.model import ImageClassifier

ONNX_OPSET = 18


def export_fp32(network: ImageClassifier, resolution: int, path: Path) -> Path:
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
    def __init__(self, images: np.ndarray, batch_size: int = 64):
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


@dataclass(frozen=True)
class QuantizationRecipe:
    """QOperator (fused QLinearConv) with uint8 activations and int8 per-channel weights: the
    smallest file of the formats tried, with no accuracy loss on the digits test set."""

    quant_format: QuantFormat = QuantFormat.QOperator
    activation_type: QuantType = QuantType.QUInt8
    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = True
    reduce_range: bool = False


def quantize_int8(fp32_path: Path, calibration_images: np.ndarray, path: Path,
                  recipe: QuantizationRecipe = QuantizationRecipe()) -> Path:
    prepared = path.with_name(f".{path.name}.prepared.onnx")
    partial = path.with_name(f".{path.name}.partial")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
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
        prepared.unlink(missing_ok=True)
    _strip_debug_info(partial)
    os.replace(partial, path)
    return path


def parity_max_abs_diff(network: ImageClassifier, onnx_path: Path, images: np.ndarray) -> float:
    """Largest absolute logit difference between the torch network and its ONNX export."""
    expected = predict_torch(network, images)
    actual = predict_onnx(onnx_session(onnx_path), images)
    return float(np.abs(expected - actual).max())


@dataclass(frozen=True)
class ExportReport:
    fp32_path: str
    int8_path: str
    fp32_bytes: int
    int8_bytes: int
    parity_max_abs_diff: float
    fp32_accuracy: float
    int8_accuracy: float

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy


def export_candidate(
    network: ImageClassifier, resolution: int, calibration_images: np.ndarray,
    test_images: np.ndarray, test_labels: np.ndarray, directory: Path,
) -> ExportReport:
    """fp32 and int8 ONNX files in `directory`, with parity and the test accuracy of each file."""
    fp32 = export_fp32(network, resolution, directory / "model.onnx")
    int8 = quantize_int8(fp32, calibration_images, directory / "model.int8.onnx")
    accuracy = {
        path: float((predict_onnx(onnx_session(path), test_images).argmax(axis=1) == test_labels).mean())
        for path in (fp32, int8)
    }
    return ExportReport(
        fp32_path=str(fp32),
        int8_path=str(int8),
        fp32_bytes=fp32.stat().st_size,
        int8_bytes=int8.stat().st_size,
        parity_max_abs_diff=parity_max_abs_diff(network, fp32, test_images),
        fp32_accuracy=accuracy[fp32],
        int8_accuracy=accuracy[int8],
    )


@dataclass(frozen=True)
class ExportGatePolicy:
    max_accuracy_drop: float = 0.01  # int8 may lose at most 1 top-1 point against fp32
    max_size_ratio: float = 0.3  # int8 file at most 0.3x the fp32 file
    max_parity_diff: float = 1e-3  # largest |torch logit - ONNX fp32 logit|


def export_gate(report: ExportReport, policy: ExportGatePolicy) -> tuple[bool, list[str]]:
    checks = [
        (report.parity_max_abs_diff <= policy.max_parity_diff,
         f"fp32 parity: max |logit diff| {report.parity_max_abs_diff:.2e} (limit {policy.max_parity_diff:.0e})"),
        (report.accuracy_drop <= policy.max_accuracy_drop + 1e-9,
         f"int8 accuracy {report.int8_accuracy:.4f} vs fp32 {report.fp32_accuracy:.4f}: drop "
         f"{100 * report.accuracy_drop:.2f} points (limit {100 * policy.max_accuracy_drop:.2f})"),
        (report.size_ratio <= policy.max_size_ratio,
         f"int8 size {report.int8_bytes} B = {report.size_ratio:.3f}x fp32 (limit {policy.max_size_ratio}x)"),
    ]
    return all(ok for ok, _ in checks), [("ok: " if ok else "FAILED: ") + text for ok, text in checks]
