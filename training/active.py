"""Which images to label next: the champion's most uncertain predictions, balanced over the classes it
predicts and spread over its embedding space, so a budget of labels is not spent on one confusing
class or on near-duplicates of one image (margin sampling with a diversity pick, in the spirit of
Citovsky et al., 2021, "Batch active learning at scale"). And the queue's exports: a Label Studio
import file with the champion's predictions as pre-annotations, its labeling configuration, a CSV,
and a thumbnail per image.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image

# Label Studio's names for the image and the choice in the labeling configuration the export writes.
IMAGE_TAG, CHOICE_TAG = "image", "label"


@dataclass(frozen=True)
class QueueSelection:
    rows: np.ndarray  # positions in the batch, in labeling order (most worth labeling first)
    margin: np.ndarray  # top-1 minus top-2 probability of each selected row
    candidates: int  # the most uncertain rows the diversity pick chose from


def margins(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability: small when the model hesitates between two classes."""
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def _farthest_first(embeddings: np.ndarray, order: np.ndarray) -> list[int]:
    """`order`'s rows re-ordered by farthest-first traversal (greedy k-center) from its first row: each
    next row is the one farthest from every row taken so far, so the first k cover the group."""
    points = embeddings[order]
    taken = [0]
    nearest = np.linalg.norm(points - points[0], axis=1)
    for _ in range(len(order) - 1):
        nearest[taken[-1]] = -1.0
        following = int(nearest.argmax())
        taken.append(following)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[following], axis=1))
    return [int(order[position]) for position in taken]


def select_for_labeling(
    probabilities: np.ndarray, embed: Callable[[np.ndarray], np.ndarray], budget: int, candidate_factor: float = 4.0,
) -> QueueSelection:
    """Up to `budget` rows to label. The `candidate_factor` x `budget` rows of smallest margin are the
    candidates, and only they are embedded (`embed(rows)` -> their embeddings); grouped by predicted
    class, each group is ordered farthest-first in the (L2-normalised) embedding space starting from its
    most uncertain row; the groups then take turns, the group with the most uncertain candidate first.
    Memory and time beyond the probabilities grow with the budget, not the batch."""
    if budget < 1 or len(probabilities) == 0:
        return QueueSelection(np.zeros(0, np.int64), np.zeros(0), 0)
    margin = margins(probabilities)
    candidates = np.argsort(margin, kind="stable")[: max(budget, int(np.ceil(candidate_factor * budget)))]
    embeddings = embed(candidates)
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    predicted = probabilities[candidates].argmax(axis=1)
    # Positions into `candidates`, which are sorted by margin: each group's first is its most uncertain.
    groups = [
        _farthest_first(unit, np.flatnonzero(predicted == label))
        for label in sorted(set(predicted.tolist()), key=lambda label: margin[candidates[predicted == label][0]])
    ]
    chosen = [group[turn] for turn in range(max(map(len, groups))) for group in groups if turn < len(group)][:budget]
    rows = candidates[np.array(chosen, np.int64)]
    return QueueSelection(rows, margin[rows], len(candidates))


def queue_for_labeling(
    count: int, images_of: Callable[[np.ndarray], np.ndarray], logits_of: Callable[[np.ndarray], np.ndarray],
    embed: Callable[[np.ndarray], np.ndarray], temperature: float, budget: int, candidate_factor: float = 4.0, chunk: int = 512,
) -> tuple[QueueSelection, np.ndarray]:
    """`select_for_labeling` over `count` images read by position (`images_of(rows)`): one pass scores
    them `chunk` at a time and keeps only their probabilities (softmax of `logits_of(images) /
    temperature`); only the candidates are read again to be embedded. (selection, probabilities)."""
    from scipy.special import softmax

    probabilities = np.concatenate([
        softmax(logits_of(images_of(np.arange(start, min(start + chunk, count)))) / temperature, axis=1)
        for start in range(0, count, chunk)
    ]) if count else np.zeros((0, 1))
    return select_for_labeling(probabilities, lambda rows: embed(images_of(rows)), budget, candidate_factor), probabilities


def label_config(class_names: list[str]) -> str:
    """A Label Studio labeling configuration: one image, one choice among the project's classes."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in class_names)
    return (f'<View>\n  <Image name="{IMAGE_TAG}" value="${IMAGE_TAG}"/>\n'
            f'  <Choices name="{CHOICE_TAG}" toName="{IMAGE_TAG}" choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')


@dataclass(frozen=True)
class QueueItem:
    image_id: str
    batch_id: str
    image: np.ndarray  # uint8 [H, W, 3], as the model saw it
    predicted: str  # class name
    probability: float
    margin: float


def write_queue(folder: Path, items: list[QueueItem], class_names: list[str], model_version: str, url_root: str) -> dict[str, Path]:
    """The queue's files in `folder`: `thumbnails/<image_id>.png`, `tasks.json` (Label Studio tasks, each
    with the champion's prediction as a pre-annotation; an image's URL is `url_root` + its path under
    `folder`'s parent), `label_config.xml`, and `queue.csv`. Written whole, then renamed into place."""
    thumbnails = folder / "thumbnails"
    thumbnails.mkdir(parents=True, exist_ok=True)
    tasks, rows = [], []
    for rank, item in enumerate(items, start=1):
        thumbnail = thumbnails / f"{item.image_id}.png"
        Image.fromarray(item.image).save(thumbnail)
        url = url_root + thumbnail.relative_to(folder.parent).as_posix()
        tasks.append({
            "data": {IMAGE_TAG: url, "image_id": item.image_id, "batch_id": item.batch_id, "rank": rank},
            "predictions": [{
                "model_version": model_version, "score": item.probability,
                "result": [{"from_name": CHOICE_TAG, "to_name": IMAGE_TAG, "type": "choices", "value": {"choices": [item.predicted]}}],
            }],
        })
        rows.append({"rank": rank, "image_id": item.image_id, "batch_id": item.batch_id, "predicted": item.predicted,
                     "probability": round(item.probability, 4), "margin": round(item.margin, 4), "thumbnail": str(thumbnail)})
    paths = {"tasks": folder / "tasks.json", "config": folder / "label_config.xml", "csv": folder / "queue.csv"}
    contents = {"tasks": json.dumps(tasks, indent=1), "config": label_config(class_names)}
    for name, text in contents.items():
        partial = paths[name].with_suffix(".partial")
        partial.write_text(text)
        partial.replace(paths[name])
    partial = paths["csv"].with_suffix(".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["rank", "image_id", "batch_id", "predicted", "probability", "margin", "thumbnail"])
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(paths["csv"])
    return paths
