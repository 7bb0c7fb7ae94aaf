"""Evaluation: predictions from a torch or ONNX model, the metrics people read, per-slice metrics,
the confusion-matrix plot, and the promotion gate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torchmetrics.functional.classification import multiclass_calibration_error

from training.config import ModelConfig
from training.model import ImageClassifier
from training.registry import load_weights


def load_classifier(weights_path: Path, model_config: ModelConfig) -> ImageClassifier:
    network = ImageClassifier(model_config)
    network.load_state_dict(load_weights(weights_path))
    return network.eval()


@torch.inference_mode()
def predict_torch(network: ImageClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outputs = [network(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(outputs).numpy()


@torch.inference_mode()
def embed_and_predict(network: ImageClassifier, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate-layer embeddings, predicted classes) of the images."""
    embeddings = [network.embed(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    embedded = torch.cat(embeddings) if embeddings else torch.zeros((0, network.head.in_features))
    return embedded.numpy(), network.head(embedded).argmax(dim=1).numpy()


def onnx_session(model_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def predict_onnx(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    outputs = [session.run(["logits"], {"image": images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs)


def onnx_latency_ms(session: ort.InferenceSession, images: np.ndarray, batch_size: int, runs: int = 20) -> float:
    """Median wall time of one `session.run` on a batch of `batch_size` images, after a warm-up run."""
    batch = np.resize(images, (batch_size, *images.shape[1:]))
    session.run(["logits"], {"image": batch})
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(["logits"], {"image": batch})
        timings.append(time.perf_counter() - started)
    return float(np.median(timings) * 1000)


@dataclass(frozen=True)
class Metrics:
    count: int
    accuracy: float
    macro_f1: float
    ece: float
    per_class: list[dict] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    slices: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, slices: np.ndarray | None = None
) -> Metrics:
    """Accuracy, macro-F1, expected calibration error, per-class precision/recall, the confusion
    matrix, and accuracy per slice (a batch id per example)."""
    predictions = logits.argmax(axis=1)
    classes = list(range(num_classes))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    probabilities = torch.softmax(torch.from_numpy(logits).float(), dim=1)
    slice_metrics = {}
    if slices is not None:
        for name in sorted(set(slices.tolist())):
            member = slices == name
            part = classification_metrics(logits[member], labels[member], num_classes)
            slice_metrics[str(name)] = {"count": part.count, "accuracy": part.accuracy, "macro_f1": part.macro_f1, "ece": part.ece}
    return Metrics(
        count=int(len(labels)),
        accuracy=float((predictions == labels).mean()),
        # Over the classes present (in labels or predictions), so a slice is not scored on classes it lacks.
        macro_f1=float(f1_score(labels, predictions, average="macro", zero_division=0)),
        ece=float(
            multiclass_calibration_error(probabilities, torch.from_numpy(labels), num_classes=num_classes, n_bins=10)
        ),
        per_class=[
            {"class": c, "precision": float(p), "recall": float(r), "support": int(s)}
            for c, p, r, s in zip(classes, precision, recall, support)
        ],
        confusion=confusion_matrix(labels, predictions, labels=classes).tolist(),
        slices=slice_metrics,
    )


def confusion_matrix_png(confusion: list[list[int]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    figure, axes = plt.subplots(figsize=(5, 4.5), dpi=100)
    image = axes.imshow(matrix, cmap="Blues")
    axes.set(xlabel="predicted", ylabel="true", title=title, xticks=range(len(matrix)), yticks=range(len(matrix)))
    for (row, column), value in np.ndenumerate(matrix):
        if value:
            color = "white" if value > matrix.max() / 2 else "black"
            axes.text(column, row, str(value), ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


@dataclass(frozen=True)
class GatePolicy:
    absolute_floor: float = 0.9  # a first model must at least reach this test accuracy
    tolerance: float = 0.0  # a candidate may trail the champion overall by at most this
    slice_margin: float = 0.02  # ... and on any batch slice by at most this


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def gate_decision(candidate: Metrics, champion: Metrics | None, policy: GatePolicy) -> GateDecision:
    """TFX-style non-regression: the candidate must be at least as good as the champion on the same
    test set, and no slice may regress by more than the margin."""
    reasons = []
    if champion is None:
        passed = candidate.accuracy >= policy.absolute_floor
        reasons.append(
            f"first model: test accuracy {candidate.accuracy:.4f} "
            f"{'>=' if passed else '<'} floor {policy.absolute_floor:.4f}"
        )
        return GateDecision(passed, reasons)
    passed = True
    if candidate.accuracy + policy.tolerance < champion.accuracy:
        passed = False
        reasons.append(
            f"overall accuracy {candidate.accuracy:.4f} < champion {champion.accuracy:.4f} - tolerance {policy.tolerance}"
        )
    else:
        reasons.append(f"overall accuracy {candidate.accuracy:.4f} vs champion {champion.accuracy:.4f}: ok")
    for name, champion_slice in champion.slices.items():
        candidate_slice = candidate.slices.get(name)
        if candidate_slice and candidate_slice["accuracy"] + policy.slice_margin < champion_slice["accuracy"]:
            passed = False
            reasons.append(
                f"slice {name}: accuracy {candidate_slice['accuracy']:.4f} < champion "
                f"{champion_slice['accuracy']:.4f} - margin {policy.slice_margin}"
            )
    return GateDecision(passed, reasons)


@dataclass(frozen=True)
class TestSet:
    images: np.ndarray
    labels: np.ndarray
    slices: np.ndarray  # batch id of each example

    @classmethod
    def load(cls, beton_path: Path, index_path: Path) -> "TestSet":
        """The test split as written to FFCV, with each example's batch from the index beside it."""
        import polars as pl

        from training.data import read_beton

        images, labels = read_beton(beton_path)
        slices = pl.read_parquet(index_path)["batch_id"].to_numpy()
        if len(slices) != len(labels):
            raise ValueError(f"{index_path} describes {len(slices)} examples but {beton_path} holds {len(labels)}")
        return cls(images, labels, slices)


def evaluate_torch(weights_path: Path, model_config: ModelConfig, test: TestSet) -> Metrics:
    logits = predict_torch(load_classifier(weights_path, model_config), test.images)
    return classification_metrics(logits, test.labels, model_config.num_classes, test.slices)


def evaluate_onnx(model_path: Path, num_classes: int, test: TestSet) -> Metrics:
    logits = predict_onnx(onnx_session(model_path), test.images)
    return classification_metrics(logits, test.labels, num_classes, test.slices)
