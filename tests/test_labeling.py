"""The labeling queue's pick (uncertain, balanced over predicted classes, diverse), its Label Studio
export checked against Label Studio's task format and its own labeling configuration, and the way back:
a Label Studio export -> `flywheel labels import` -> a label file the loop reads."""

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import jsonschema
import numpy as np
import polars as pl
import pytest

from flywheel.cli import main
from training.active import CHOICE_TAG, IMAGE_TAG, QueueItem, select_for_labeling, write_queue
from transforms.labels import read_label_files

CLASSES = [f"class-{k}" for k in range(5)]

# Label Studio's task import format (labelstud.io/guide/tasks: "Basic Label Studio JSON format", and
# /guide/predictions for pre-annotations of a Choices tag).
TASK_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "object", "required": [IMAGE_TAG], "properties": {IMAGE_TAG: {"type": "string"}}},
            "predictions": {"type": "array", "items": {
                "type": "object", "required": ["result"],
                "properties": {
                    "model_version": {"type": "string"}, "score": {"type": "number"},
                    "result": {"type": "array", "items": {
                        "type": "object", "required": ["from_name", "to_name", "type", "value"],
                        "properties": {"type": {"const": "choices"}, "value": {
                            "type": "object", "required": ["choices"],
                            "properties": {"choices": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                        }},
                    }},
                },
            }},
        },
    },
}


def probabilities_with_margin(predicted: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Rows whose top class is `predicted` with a top-1 minus top-2 gap of `margin`."""
    rows = np.full((len(predicted), len(CLASSES)), 0.0)
    second = (predicted + 1) % len(CLASSES)
    rows[np.arange(len(rows)), predicted] = 0.5 + margin / 2
    rows[np.arange(len(rows)), second] = 0.5 - margin / 2
    return rows


def test_the_queue_takes_uncertain_images_turn_by_turn_over_predicted_classes_and_skips_near_duplicates():
    rng = np.random.default_rng(0)
    # 200 confident images, then 40 uncertain ones predicted class 0: 10 near-copies of one image (the
    # most uncertain of all) and 10 distinct images; then 5 distinct images predicted as each of classes 1-4.
    predicted = np.concatenate([rng.integers(0, 5, 200), np.zeros(20, int), np.repeat([1, 2, 3, 4], 5)])
    margin = np.concatenate([rng.uniform(0.6, 1.0, 200), rng.uniform(0.0, 0.04, 10), rng.uniform(0.04, 0.05, 10), rng.uniform(0.05, 0.2, 20)])
    copies = np.ones((10, 8)) + rng.normal(0, 1e-3, (10, 8))
    embeddings = np.concatenate([rng.normal(size=(200, 8)), copies, rng.normal(size=(30, 8))])
    embedded = []

    def embed(rows: np.ndarray) -> np.ndarray:
        embedded.append(rows)
        return embeddings[rows]

    selection = select_for_labeling(probabilities_with_margin(predicted, margin), embed, budget=10, candidate_factor=4)
    assert selection.candidates == 40 and len(embedded) == 1 and set(embedded[0]) == set(range(200, 240))  # only candidates are embedded
    assert len(selection.rows) == 10 and len(set(selection.rows)) == 10
    assert set(selection.rows) <= set(range(200, 240)) and np.all(selection.margin < 0.2)
    chosen_classes = predicted[selection.rows]
    assert sorted(np.bincount(chosen_classes, minlength=5)) == [2, 2, 2, 2, 2]  # balanced over predicted classes
    # Class 0 goes first (the most uncertain candidate) with its most uncertain copy; its second pick is
    # a distinct image, not another copy, though every copy is more uncertain.
    assert selection.rows[0] == 200 + int(np.argmin(margin[200:210]))
    class_0 = selection.rows[chosen_classes == 0]
    assert len(class_0) == 2 and 210 <= class_0[1] < 220
    # Margin order alone would have spent the whole budget on the near-copies of one image.
    assert set(np.argsort(margin)[:10]) == set(range(200, 210))
    assert len(select_for_labeling(probabilities_with_margin(predicted, margin), embed, budget=0).rows) == 0


def items(count: int) -> list[QueueItem]:
    rng = np.random.default_rng(1)
    return [QueueItem(f"b-{n:03d}", "b", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), CLASSES[n % 5], 0.6, 0.2) for n in range(count)]


def test_the_export_is_label_studio_tasks_whose_pre_annotations_fit_its_labeling_configuration(tmp_path: Path):
    paths = write_queue(tmp_path / "labeling" / "b", items(6), CLASSES + ['a "quoted" & <odd> name'], "v0003", "/data/local-files/?d=")
    tasks = json.loads(paths["tasks"].read_text())
    jsonschema.validate(tasks, TASK_SCHEMA)
    config = ElementTree.fromstring(paths["config"].read_text())
    image, choices = config.find("Image"), config.find("Choices")
    assert image.get("name") == IMAGE_TAG and image.get("value") == f"${IMAGE_TAG}"
    names = [choice.get("value") for choice in choices.findall("Choice")]
    assert names == CLASSES + ['a "quoted" & <odd> name'] and choices.get("toName") == IMAGE_TAG
    for rank, task in enumerate(tasks, start=1):
        (result,) = task["predictions"][0]["result"]
        assert result["from_name"] == choices.get("name") == CHOICE_TAG and result["to_name"] == IMAGE_TAG
        assert result["value"]["choices"][0] in names and task["predictions"][0]["model_version"] == "v0003"
        thumbnail = task["data"][IMAGE_TAG].removeprefix("/data/local-files/?d=")
        assert (tmp_path / "labeling" / thumbnail).is_file() and task["data"]["rank"] == rank
    queue = pl.read_csv(paths["csv"])
    assert queue["image_id"].to_list() == [f"b-{n:03d}" for n in range(6)] and all(Path(t).is_file() for t in queue["thumbnail"])


def test_a_label_studio_export_comes_back_as_a_label_file(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    tasks = json.loads(write_queue(tmp_path / "labeling" / "b", items(5), CLASSES, "v0001", "")["tasks"].read_text())

    def annotated(task: dict, choices: list[str], cancelled: bool = False) -> dict:
        result = [{"from_name": CHOICE_TAG, "to_name": IMAGE_TAG, "type": "choices", "value": {"choices": choices}}]
        return task | {"annotations": [{"result": result, "was_cancelled": cancelled}]}

    export = [
        annotated(tasks[0], ["class-3"]),
        annotated(tasks[1], ["class-1"], cancelled=True),  # skipped by the labeler: left for later
        tasks[2],  # not labeled yet
        annotated(tasks[3], ["class-1", "class-2"]),  # two choices: a problem, named
        annotated({"data": {"image": "x.png"}}, ["class-0"]),  # not from the queue
        annotated(tasks[4], ["class-4"]),
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    main(["labels", "import", str(tmp_path / "export.json"), "--name", "reviewed-1"])
    out, err = capsys.readouterr()
    assert "wrote 2 label(s)" in out and "task 4 (image_id b-003): expected one chosen class" in err and "task 5: no data.image_id" in err
    label_set = read_label_files(tmp_path / "home" / "landing" / "labels", [], CLASSES)
    assert dict(zip(label_set.labels["image_id"], label_set.labels["label"])) == {"b-000": 3, "b-004": 4}

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main(["labels", "import", str(tmp_path / "broken.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"flywheel labels: {tmp_path / 'broken.json'}: not a readable")


def test_the_queue_scores_a_batch_a_chunk_at_a_time_and_reads_only_the_candidates_again():
    from scipy.special import softmax

    from training.active import queue_for_labeling

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (1300, 5))
    reads: list[int] = []

    def images_of(rows: np.ndarray) -> np.ndarray:
        reads.append(len(rows))
        return rows[:, None].astype(float)  # an "image" is its row number: logits_of looks it up

    selection, probabilities = queue_for_labeling(
        1300, images_of, lambda images: logits[images[:, 0].astype(int)], lambda images: np.hstack([images, images ** 2]),
        temperature=2.0, budget=20, chunk=512,
    )
    assert reads == [512, 512, 276, 80]  # three chunks of scoring, then the 4 x 20 candidates once
    np.testing.assert_allclose(probabilities, softmax(logits / 2.0, axis=1))
    assert len(selection.rows) == 20 and selection.candidates == 80
