import io
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from flywheel.cli import main
from orchestration.assets.deployment import ExportConfig
from training.config import ModelConfig
from training.inference import load_classifier
from training import evaluate
from training.export import export_candidate
from training.registry import WEIGHTS_FILE, Registry
from tests.conftest import model_card


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    return exit_info.value.code


@pytest.fixture
def champion(home: Path, trained_weights: Path, digits_splits: dict) -> Path:
    registry = Registry(home / "registry")
    staging = registry.staging_dir("test")
    network = load_classifier(trained_weights, ModelConfig(width=32))
    test = evaluate.TestSet.of_arrays(digits_splits["images"]["test"], digits_splits["labels"]["test"])
    report = export_candidate(network, 32, digits_splits["images"]["val"], test, staging, ExportConfig().policy())
    shutil.copyfile(trained_weights, staging / WEIGHTS_FILE)
    card = model_card(resolution=32, training_batches=("a",), test_accuracy=report.fp32_accuracy)
    version = registry.publish(staging, card)
    registry.promote(version.version, "test")
    return home


def test_simulate_writes_landing_batches_once(home: Path, capsys):
    assert run_cli("simulate", "--batches", "2", "--size", "20") == 0
    files = sorted((home / "landing").glob("*.parquet"))
    assert [f.name for f in files] == ["digits-000.parquet", "digits-001.parquet"]
    frame = pl.read_parquet(files[0])
    assert frame.height == 20 and frame.schema["image"] == pl.Binary and frame["label"].null_count() == 0
    assert run_cli("simulate", "--batches", "2", "--size", "20") == 0
    assert "kept existing" in capsys.readouterr().out


def test_simulate_drift_and_unlabeled(home: Path):
    assert run_cli("simulate", "--batches", "1", "--size", "10", "--drift", "rotation", "--unlabeled", "--prefix", "rot") == 0
    frame = pl.read_parquet(home / "landing" / "rot-000.parquet")
    assert frame["label"].null_count() == 10 and set(frame["drift"]) == {"rotation"}


def test_simulate_refuses_bad_options_with_a_message(home: Path, capsys):
    assert run_cli("simulate", "--strength", "3") == 2
    assert "drift strength must be within [0, 1]" in capsys.readouterr().err
    assert run_cli("simulate", "--prefix", "../escape") == 2
    assert "is not allowed" in capsys.readouterr().err


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (32, 32), value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_scores_good_files_and_reports_bad_ones(champion: Path, tmp_path: Path, capsys, monkeypatch):
    assert run_cli("simulate", "--batches", "1", "--size", "12") == 0
    landing = champion / "landing" / "digits-000.parquet"
    with_bad_row = tmp_path / "mixed.parquet"
    frame = pl.read_parquet(landing).head(3)
    frame = frame.with_columns(pl.Series("image", [frame["image"][0], b"not an image", frame["image"][2]]))
    frame.write_parquet(with_bad_row)
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes(0))
    junk = tmp_path / "junk.parquet"
    junk.write_text("no parquet here")
    output = tmp_path / "out" / "predictions.csv"

    code = run_cli("predict", str(landing), str(with_bad_row), str(image), str(junk), "--output", str(output))

    assert code == 1
    err = capsys.readouterr().err
    assert f"{junk}: not a readable parquet file" in err
    assert f"{with_bad_row}: row 2" in err
    predictions = pl.read_csv(output)
    assert predictions.columns == ["image_id", "label", "label_name", "probability"]
    assert predictions.height == 12 + 2 + 1
    assert predictions["label"].is_between(0, 9).all() and predictions["probability"].is_between(0, 1).all()
    truth = pl.read_parquet(landing).select("image_id", pl.col("label").alias("truth"))
    joined = truth.join(predictions, on="image_id")
    assert (joined["truth"] == joined["label"]).mean() >= 0.75

    # Scored and written a few images at a time: the same answers, in the same order.
    import flywheel.predict

    monkeypatch.setattr(flywheel.predict, "PREDICT_CHUNK", 4)
    chunked = tmp_path / "out" / "chunked.parquet"
    assert run_cli("predict", str(landing), str(with_bad_row), str(image), str(junk), "--output", str(chunked), "--top-k", "2") == 1
    again = pl.read_parquet(chunked)
    assert again["image_id"].to_list() == predictions["image_id"].to_list()
    assert again["label"].to_list() == predictions["label"].to_list()
    assert np.allclose(again["probability"].to_numpy(), predictions["probability"].to_numpy(), atol=1e-6)
    assert "label_name_2" in again.columns and not list(chunked.parent.glob(".*partial"))


def test_predict_needs_a_champion(home: Path, tmp_path: Path, capsys):
    image = tmp_path / "one.png"
    image.write_bytes(png_bytes(0))
    assert run_cli("predict", str(image), "--output", str(tmp_path / "p.parquet")) == 2
    assert "no champion" in capsys.readouterr().err


def test_status_shows_the_champion(champion: Path, capsys):
    assert run_cli("status") == 0
    out = capsys.readouterr().out
    assert "champion: v0001" in out and "versions:" in out


def test_rollback_command(champion: Path, capsys):
    assert run_cli("rollback") == 2
    assert "replaced no earlier champion" in capsys.readouterr().err
    assert run_cli("rollback", "--to", "v0042") == 2
    assert "v0042 is not in the registry" in capsys.readouterr().err


def test_tune_refuses_a_bad_budget_and_names_what_is_missing_in_one_line(home: Path, capsys):
    assert run_cli("tune", "--trials", "0") == 2
    assert capsys.readouterr().err == "flywheel tune: trials: Input should be greater than or equal to 1\n"
    assert run_cli("tune", "--trials", "1") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"flywheel tune: tuning failed: FileNotFoundError: warehouse {home / 'warehouse.duckdb'} does not exist yet: ingest a batch first"
    )
