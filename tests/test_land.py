"""`flywheel land`: a user's photos (an ImageFolder tree, a manifest of local paths or s3:// URIs on a
real S3-compatible server on loopback) into landing batches, named classes through ingestion to a
champion that predicts names, and every kind of bad item named in one line while the good land once."""

import io
import random
from dataclasses import replace
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from orchestration.definitions import defs
from tests.conftest import FAST_TRAINING, resources_for
from tests.test_cli import run_cli
from training.registry import Registry
import transforms.land as land_module
from transforms.landing import declared_classes

CLASSES = {"cat": (200, 60, 40), "dog": (50, 160, 70), "golden retriever": (60, 80, 210)}
FORMATS = ("JPEG", "PNG", "WEBP")


def photo(color: tuple[int, int, int], rng: random.Random, fmt: str, orientation: int | None = None) -> bytes:
    """A noisy 'photo' of the class colour at a random size, aspect and format, maybe with an EXIF orientation."""
    width, height = rng.randint(40, 120), rng.randint(40, 120)
    image = Image.effect_noise((width, height), rng.uniform(20, 60)).convert("RGB")
    tint = Image.new("RGB", (width, height), tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in color))
    image = Image.blend(image, tint, 0.7)
    buffer = io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, format=fmt, exif=exif)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def image_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for name, color in CLASSES.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            fmt = FORMATS[index % len(FORMATS)]
            orientation = (None, 3, 6, 8)[index % 4] if fmt == "JPEG" else None
            suffix = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            (root / name / f"{name[:3]}-{index:04d}.{suffix}").write_bytes(photo(color, rng, fmt, orientation))
    return root


def landed(home: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((home / "landing").glob("*.parquet")))


def warehouse_rows(home: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as connection:
        return connection.execute(sql).fetchall()


@pytest.mark.e2e
def test_an_image_folder_lands_once_trains_a_champion_with_named_classes_and_predicts_names(home: Path, tmp_path: Path, capsys):
    source = image_folder(tmp_path / "photos", per_class=100)

    assert run_cli("land", str(source), "--batch-size", "120") == 0
    out = capsys.readouterr().out
    assert "landed 300 new image(s) in 3 batch file(s); 0 already landed; 0 skipped" in out
    frame = landed(home)
    assert frame.height == 300 and frame["image_id"].n_unique() == 300
    assert dict(frame.group_by("label").len().iter_rows()) == {name: 100 for name in CLASSES}
    assert [p.name for p in sorted((home / "landing").glob("*.parquet"))] == ["photos-000.parquet", "photos-001.parquet", "photos-002.parquet"]

    # Landing the same folder again adds nothing.
    assert run_cli("land", str(source)) == 0
    assert "landed 0 new image(s) in 0 batch file(s); 300 already landed; 0 skipped" in capsys.readouterr().out
    assert len(list((home / "landing").glob("*.parquet"))) == 3

    # Photos come in every aspect: crop them to the square rather than stretch them.
    (home / "flywheel.yaml").write_text(yaml.safe_dump({"resize": "center_crop", "trained_model": FAST_TRAINING}))
    assert run_cli("run") == 0
    champion = Registry(home / "registry").champion()
    assert champion is not None, capsys.readouterr().out
    card = champion.card()
    assert card.class_names == sorted(CLASSES) and card.model.num_classes == 3
    assert (card.input.height, card.input.resize, card.input.mode) == (32, "center_crop", "rgb")
    assert warehouse_rows(home, "SELECT class_index, class_name FROM classes ORDER BY class_index") == list(enumerate(sorted(CLASSES)))

    # Photos it never saw, as image files: predicted by name.
    rng = random.Random(99)
    files = []
    for name, color in CLASSES.items():
        for index in range(4):
            path = tmp_path / "new" / f"{name.replace(' ', '_')}-{index}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(photo(color, rng, "JPEG", orientation=6 if index % 2 else None))
            files.append((path, name))
    output = tmp_path / "predictions.csv"
    assert run_cli("predict", *[str(p) for p, _ in files], "--output", str(output), "--top-k", "2") == 0
    predictions = pl.read_csv(output)
    assert predictions.columns == [
        "image_id", "label", "label_name", "probability", "label_2", "label_name_2", "probability_2",
    ]
    assert (predictions["probability"] >= predictions["probability_2"]).all()
    assert (predictions["label_name"] != predictions["label_name_2"]).all()
    truth = {path.stem: name for path, name in files}  # an image file's id is its name without the suffix
    right = sum(truth[i] == n for i, n in zip(predictions["image_id"], predictions["label_name"]))
    assert right >= 10, predictions  # of 12; the classes differ by colour, which a first model learns

    assert run_cli("status") == 0
    assert "classes        cat, dog, golden retriever" in capsys.readouterr().out


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, and a bucket of photos."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for variable, value in {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }.items():
        monkeypatch.setenv(variable, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="photos")
    yield client
    server.stop()


def test_a_manifest_of_s3_uris_lands_and_ingests_named_classes_and_names_each_bad_row(home: Path, tmp_path: Path, s3, capsys):
    rng = random.Random(1)
    rows = []
    for name, color in CLASSES.items():
        for index in range(6):
            key = f"shoot/{name}/{index}.jpg"
            s3.put_object(Bucket="photos", Key=key, Body=photo(color, rng, "JPEG"))
            rows.append({"path_or_uri": f"s3://photos/{key}", "label": name})
    s3.put_object(Bucket="photos", Key="shoot/broken.jpg", Body=b"not an image at all")
    local = tmp_path / "local.png"
    local.write_bytes(photo(CLASSES["cat"], rng, "PNG"))
    bad = [
        {"path_or_uri": "s3://photos/shoot/missing.jpg", "label": "cat"},  # row 19: no such object
        {"path_or_uri": "s3://no-such-bucket/x.jpg", "label": "cat"},  # row 20: unreachable bucket
        {"path_or_uri": "s3://photos/shoot/broken.jpg", "label": "dog"},  # row 21: not an image
        {"path_or_uri": "s3://photos/shoot/cat/0.jpg", "label": "cat"},  # row 22: the same path as row 1
        {"path_or_uri": "missing.png", "label": "dog"},  # row 23: a relative path that does not exist
        {"path_or_uri": "local.png", "label": "cat"},  # row 24: a good local file beside the manifest
    ]
    manifest = tmp_path / "manifest.csv"
    pl.DataFrame(rows + bad).write_csv(manifest)

    assert run_cli("land", str(manifest), "--batch-id", "shoot") == 1  # landed, with problems to report
    captured = capsys.readouterr()
    assert "landed 19 new image(s) in 1 batch file(s); 0 already landed; 5 skipped" in captured.out
    problems = [line for line in captured.err.splitlines() if line.startswith("skipped: ")]
    expected = [
        f"{manifest}: row 19 (s3://photos/shoot/missing.jpg): not found (photos/shoot/missing.jpg): skipped",
        f"{manifest}: row 20 (s3://no-such-bucket/x.jpg): not found (The specified bucket does not exist): skipped",
        f"{manifest}: row 21 (s3://photos/shoot/broken.jpg): not a readable image (cannot identify image file",
        f"{manifest}: row 22: s3://photos/shoot/cat/0.jpg is the same as row 1: skipped",
        f"{manifest}: row 23 ({tmp_path / 'missing.png'}): file not found: skipped",
    ]
    assert len(problems) == len(expected) and all(p.startswith(f"skipped: {e}") for p, e in zip(problems, expected)), problems
    frame = landed(home)
    assert frame.height == 19 and set(frame["source"]) >= {f"s3://photos/shoot/cat/{i}.jpg" for i in range(6)}

    # The same manifest again: nothing new.
    assert run_cli("land", str(manifest), "--batch-id", "shoot") == 1
    assert "landed 0 new image(s) in 0 batch file(s); 19 already landed" in capsys.readouterr().out

    # Ingestion discovers the classes from the names and stores labels as their indices.
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", ["shoot-000"])
    ingest = [a for a in defs.assets if "raw_images" in {k.to_user_string() for k in a.keys}]
    assert dg.materialize(ingest, partition_key="shoot-000", resources=resources_for(home), instance=instance).success
    assert warehouse_rows(home, "SELECT class_name FROM classes ORDER BY class_index") == [(n,) for n in sorted(CLASSES)]
    assert warehouse_rows(home, "SELECT label, count(*) FROM raw_images GROUP BY label ORDER BY label") == [(0, 7), (1, 6), (2, 6)]


def test_folder_problems_are_named_one_line_each_and_the_good_images_land(home: Path, tmp_path: Path, capsys):
    source = image_folder(tmp_path / "photos", per_class=2)
    (source / "cat" / "garbage.jpg").write_bytes(b"a text file with an image's name")
    (source / "bad|name").mkdir()
    (source / "bad|name" / "x.png").write_bytes(photo((1, 2, 3), random.Random(0), "PNG"))
    (source / "loose.png").write_bytes(photo((1, 2, 3), random.Random(1), "PNG"))
    (source / ".thumbnails").mkdir()  # hidden folders are not classes
    (source / ".thumbnails" / "t.png").write_bytes(photo((1, 2, 3), random.Random(2), "PNG"))

    assert run_cli("land", str(source)) == 1
    captured = capsys.readouterr()
    assert "landed 6 new image(s) in 1 batch file(s); 0 already landed; 3 skipped" in captured.out
    problems = sorted(line for line in captured.err.splitlines() if line.startswith("skipped: "))
    expected = sorted([
        f"skipped: {source / 'bad|name'}: class name 'bad|name' is not allowed (1-64 letters, digits, spaces and _ . + -, "
        "starting with a letter or digit): its images were skipped; rename the folder",
        f"skipped: {source / 'cat' / 'garbage.jpg'}: not a readable image (cannot identify image file",
        f"skipped: {source / 'loose.png'}: not inside a class folder, so it has no label: skipped (SOURCE/<class>/<image>)",
    ])
    assert len(problems) == 3 and all(p.startswith(e) for p, e in zip(problems, expected)), problems
    assert sorted(landed(home)["label"].unique()) == sorted(CLASSES)
    (batch_file,) = (home / "landing").glob("*.parquet")
    assert declared_classes(batch_file) == sorted(CLASSES)  # the landing names every class it saw

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("land", str(empty)) == 2
    assert capsys.readouterr().err.strip().startswith(f"flywheel land: {empty}: no images found (")


def test_class_folders_named_in_any_script_land_under_their_composed_names(home: Path, tmp_path: Path, capsys):
    source = tmp_path / "photos"
    names = {"cafe\u0301": "café", "猫": "猫", "Straße 2": "Straße 2"}  # the first decomposed, as macOS writes it
    for index, folder in enumerate([*names, "wedge ▲"]):
        (source / folder).mkdir(parents=True)
        (source / folder / "a.png").write_bytes(photo((40 * index, 90, 200), random.Random(index), "PNG"))
    assert run_cli("land", str(source)) == 1
    err = capsys.readouterr().err
    assert f"skipped: {source / 'wedge ▲'}: class name 'wedge ▲' is not allowed" in err
    assert sorted(landed(home)["label"]) == sorted(names.values())
    assert sorted(declared_classes(next((home / "landing").glob("*.parquet")))) == sorted(names.values())


def test_an_unknown_class_name_is_quarantined_with_how_to_add_it_and_adding_it_ingests_it(home: Path, tmp_path: Path, capsys):
    (home / "flywheel.yaml").write_text(yaml.safe_dump({"classes": ["cat", "dog"]}))
    source = image_folder(tmp_path / "photos", per_class=3)  # cat, dog and golden retriever
    assert run_cli("land", str(source), "--batch-id", "pets") == 0
    capsys.readouterr()
    resources, instance = resources_for(home), dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("batches", ["pets-000"])
    ingest = [a for a in defs.assets if "raw_images" in {k.to_user_string() for k in a.keys}]
    assert dg.materialize(ingest, partition_key="pets-000", resources=resources, instance=instance).success

    quarantined = warehouse_rows(home, "SELECT reason, message FROM quarantined_images ORDER BY row_number")
    assert [reason for reason, _ in quarantined] == ["unknown_class"] * 3
    assert quarantined[0][1].endswith(
        "label 'golden retriever' is not one of the project's classes (cat, dog); to add it, append it to `classes` in "
        "flywheel.yaml and ingest the batch again"
    )
    assert warehouse_rows(home, "SELECT count(*) FROM raw_images") == [(6,)]

    # Classes already stored keep their indices: reordering them is refused in one line...
    (home / "flywheel.yaml").write_text(yaml.safe_dump({"classes": ["dog", "cat", "golden retriever"]}))
    failed = dg.materialize(ingest, partition_key="pets-000", resources=resources, instance=instance, raise_on_error=False)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_failure_data.user_failure_data.description.startswith(
        "flywheel.yaml lists classes ['dog', 'cat', 'golden retriever'], but the warehouse already holds ['cat', 'dog']"
    )
    # ... and appending the new class accepts its images on the next ingestion.
    (home / "flywheel.yaml").write_text(yaml.safe_dump({"classes": ["cat", "dog", "golden retriever"]}))
    assert dg.materialize(ingest, partition_key="pets-000", resources=resources, instance=instance).success
    assert warehouse_rows(home, "SELECT count(*), count(DISTINCT label) FROM raw_images") == [(9, 3)]
    assert warehouse_rows(home, "SELECT count(*) FROM quarantined_images") == [(0,)]
    assert warehouse_rows(home, "SELECT class_name FROM classes ORDER BY class_index") == [("cat",), ("dog",), ("golden retriever",)]


def test_a_wrong_field_in_flywheel_yaml_is_one_line_naming_it(home: Path, capsys):
    (home / "flywheel.yaml").write_text("classes: [cat]\nresolution: 4\n")
    assert run_cli("run") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err == (
        f"flywheel run: {home / 'flywheel.yaml'}: classes: a classifier needs at least two classes; "
        "resolution: Input should be greater than or equal to 8"
    )
    (home / "flywheel.yaml").write_text("retraining:\n  schedule: every monday\n  max_attempts: 0\n")
    assert run_cli("run") == 2
    assert capsys.readouterr().err.strip() == (
        f"flywheel run: {home / 'flywheel.yaml'}: retraining.schedule: 'every monday' is not a cron schedule "
        "(minute hour day-of-month month day-of-week, e.g. '0 3 * * 1'); retraining.max_attempts: Input should be "
        "greater than or equal to 1"
    )


def test_a_batch_is_written_in_row_groups_and_a_failure_mid_batch_leaves_only_whole_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = image_folder(tmp_path / "photos", per_class=4)  # 12 images
    monkeypatch.setattr(land_module, "ROW_GROUP_BYTES", 1)  # every image its own row group
    landing = tmp_path / "landing"
    report = land_module.land(land_module.open_source(str(source), None, []), landing, "rg", 5, [])
    assert [pq.ParquetFile(path).metadata.num_row_groups for path in report.written] == [5, 5, 2]
    assert report.landed == 12 and landed_ids(landing) == 12

    def failing(items):
        for count, item in enumerate(items):
            if count == 7:
                raise OSError("the source disk went away")
            yield item

    second = tmp_path / "photos2"
    image_folder(second, per_class=4, seed=1)
    opened = land_module.open_source(str(second), None, [])
    with pytest.raises(OSError, match="went away"):
        land_module.land(replace(opened, items=failing(opened.items)), landing, "rg", 5, [])
    assert not list(landing.glob(".*")), "a failed batch leaves its partial file behind"
    assert landed_ids(landing) == 12 + 5  # the batch completed before the failure landed; the rest did not


def landed_ids(landing: Path) -> int:
    return pl.read_parquet(sorted(landing.glob("*.parquet")), columns=["image_id"]).height
