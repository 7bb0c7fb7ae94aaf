"""Evaluation: the metrics people read, per-slice metrics, the confusion-matrix plot, and the
candidate against the champion on the same test images through the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torchmetrics.functional.classification import multiclass_calibration_error

from training.gate import GateDecision, GatePolicy, ModelAnswers, promotion_decision
from training.results import Metrics


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


def confusion_matrix_png(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    figure, axes = plt.subplots(figsize=(5, 4.5), dpi=100)
    image = axes.imshow(matrix, cmap="Blues")
    axes.set(xlabel="predicted", ylabel="true", title=title, xticks=range(len(matrix)), yticks=range(len(matrix)))
    axes.set_xticklabels(class_names, rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right" if max(map(len, class_names)) > 2 else "center")
    axes.set_yticklabels(class_names)
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
class TestSet:
    """The test split: labels and each example's batch in memory (small), the images read a batch at
    a time, so evaluating and exporting hold one batch of pixels whatever the size of the split."""

    labels: np.ndarray
    slices: np.ndarray  # batch id of each example
    image_batches: Callable[[int], Iterator[np.ndarray]]  # batch size -> the images in order

    @classmethod
    def load(cls, beton_path: Path, index_path: Path) -> TestSet:
        """The test split as written to FFCV, with each example's label and batch from the index beside it."""
        import polars as pl

        from training.data import beton_batches, beton_length

        index = pl.read_parquet(index_path, columns=["label", "batch_id"])
        if (held := beton_length(beton_path)) != index.height:
            raise ValueError(f"{index_path} describes {index.height} examples but {beton_path} holds {held}")
        return cls(
            index["label"].to_numpy().astype(np.int64), index["batch_id"].to_numpy(),
            lambda batch_size: (images for images, _ in beton_batches(beton_path, batch_size)),
        )

    @classmethod
    def of_arrays(cls, images: np.ndarray, labels: np.ndarray, slices: np.ndarray | None = None) -> TestSet:
        """Images already in memory (small data: tests and benchmarks)."""
        slices = np.full(len(labels), "all") if slices is None else slices
        return cls(labels, slices, lambda batch_size: (images[i : i + batch_size] for i in range(0, len(images), batch_size)))

    def in_memory(self) -> TestSet:
        """The same test set with its images read once, for a caller that passes over them many times."""
        return TestSet.of_arrays(np.concatenate(list(self.image_batches(256))), self.labels, self.slices)

    def logits(self, *models: Callable[[np.ndarray], np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
        """Each model's logits on every test image, all in one pass over the images."""
        outputs: list[list[np.ndarray]] = [[] for _ in models]
        for images in self.image_batches(batch_size):
            for output, model in zip(outputs, models):
                output.append(model(images))
        return [np.concatenate(output) for output in outputs]

    def accuracy(self, logits: np.ndarray) -> float:
        return float((logits.argmax(axis=1) == self.labels).mean())

    def first_images(self, count: int) -> np.ndarray:
        """The first `count` images (fewer if the split is smaller): a sample to time a model on."""
        return next(iter(self.image_batches(count)))


Predict = Callable[[np.ndarray], np.ndarray]  # a batch of images -> logits


def evaluate_models(
    test: TestSet, candidate: Predict, champion: Predict | None, num_classes: int, policy: GatePolicy, model: str,
) -> Evaluation:
    """`evaluate_candidate` on the logits of both models, computed in one pass over the test images."""
    candidate_logits, *champion_logits = test.logits(candidate, *([champion] if champion else []))
    return evaluate_candidate(candidate_logits, champion_logits[0] if champion_logits else None, test, num_classes, policy, model)


def answers(logits: np.ndarray, metrics: Metrics) -> ModelAnswers:
    return ModelAnswers(predictions=logits.argmax(axis=1), ece=metrics.ece)


@dataclass(frozen=True)
class Evaluation:
    candidate: Metrics
    champion: Metrics | None
    gate: GateDecision
    candidate_logits: np.ndarray

    def worst_misclassified(self, labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, confidences): the test rows the candidate got wrong with the most confidence (its
        softmax probability of the wrong class), most confident first."""
        exp = np.exp(self.candidate_logits - self.candidate_logits.max(axis=1, keepdims=True))
        confidence = exp.max(axis=1) / exp.sum(axis=1)
        wrong = np.flatnonzero(self.candidate_logits.argmax(axis=1) != labels)
        rows = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
        return rows, confidence[rows]


def evaluate_candidate(
    candidate_logits: np.ndarray, champion_logits: np.ndarray | None, test: TestSet, num_classes: int,
    policy: GatePolicy, model: str,
) -> Evaluation:
    """Metrics of the candidate and the champion on the same test images, and the promotion gate's
    decision on their paired predictions; `model` names the files judged ("fp32", "int8"). A champion
    from before a class was added never predicts it: its logits get the new columns at -1e4, so it is
    judged wrong on the new class's images and compared as it was on the shared ones."""
    if champion_logits is not None and champion_logits.shape[1] < num_classes:
        missing = num_classes - champion_logits.shape[1]
        champion_logits = np.pad(champion_logits, ((0, 0), (0, missing)), constant_values=-1e4)
    candidate = classification_metrics(candidate_logits, test.labels, num_classes, test.slices)
    champion = None if champion_logits is None else classification_metrics(champion_logits, test.labels, num_classes, test.slices)
    decision = promotion_decision(
        test.labels, test.slices, answers(candidate_logits, candidate),
        None if champion is None else answers(champion_logits, champion), policy, model,
    )
    return Evaluation(candidate, champion, decision, candidate_logits)
