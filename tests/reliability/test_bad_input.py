"""Bad input beyond a landing file's rows: malformed run settings, an unknown drift kind, an empty
landing zone, a champion pointer to a missing version, a corrupted champion, ONNX files that are
not a servable model, and a landing file still being copied.

Each one ends in a message that names the thing and the reason, and damages nothing: the registry's
files, the champion pointer and the warehouse's rows are what they were."""

from pathlib import Path

import duckdb
import onnx
import pytest

from orchestration.instance import get_instance
from flywheel.loop import failure_message
from tests.conftest import model_card, write_servable_files
from tests.reliability.conftest import file_hashes, warehouse_snapshot
from tests.test_cli import png_bytes, run_cli
from training.registry import CHAMPION_FILE, HISTORY_FILE, Registry, RegistryError
from transforms.landing import landed_files
from transforms.simulate import DRIFT_KINDS, SimulationSpec, simulate_batches

def publish_servable(registry: Registry, name: str) -> str:
    """Publish a tiny but real servable version; returns its version name."""
    return registry.publish(write_servable_files(registry.staging_dir(name)), model_card()).version


@pytest.fixture
def registry(home: Path) -> Registry:
    """A real registry under the data root with v0001 published and promoted to champion."""
    # Resolved like the CLI's data root, so the paths in its messages compare equal.
    registry = Registry(home.resolve() / "registry")
    registry.promote(publish_servable(registry, "first"), "test")
    return registry


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "one.png"
    path.write_bytes(png_bytes(0))
    return path


# --- 1. malformed `flywheel run --config` settings ---------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("trained_model: {epochs: 0}\n", ["trained_model.epochs", "greater than or equal to 1"]),
        ("trained_model: {epochs: -3}\n", ["trained_model.epochs", "greater than or equal to 1"]),
        ("trained_model: {epoch: 3}\n", ["trained_model has no setting 'epoch'", "epochs"]),
        ("trained_modle: {epochs: 3}\n", ["'trained_modle' is not a setting", "classes, resolution", "trained_model"]),
        ("trained_model: 12\n", ["trained_model must be a mapping"]),
        ("trained_model: {epochs: [3\n", ["not a readable YAML file"]),
        ("- trained_model\n- epochs\n", ["expected a mapping of setting -> value, got list"]),
        ("classes: [cat]\n", ["classes: a classifier needs at least two classes"]),
        ("classes: [cat, 'bad/name']\n", ["classes: class name 'bad/name' is not allowed"]),
        ("classes: [cat, dog, cat]\n", ["classes: listed more than once: cat"]),
        ("resolution: 4\n", ["resolution: Input should be greater than or equal to 8"]),
        ("trained_model: {backbone: resnet19}\n", ["trained_model.backbone: unknown backbone 'resnet19': one of resnet_small, resnet18", "timm/<name>"]),
        ("trained_model: {recipe: photo}\n", ["trained_model: unknown augmentation recipe 'photo': one of none, small_images, photos"]),
        ("trained_model: {start_resolution: 16}\n", ["trained_model: start_resolution (progressive resizing) needs random_resized_crop: true"]),
        ("tuned_hyperparameters: {learning_rate: [0.01, 0.001]}\n", ["tuned_hyperparameters: learning_rate: the range must be [low, high] with 0 <= low < high, got [0.01, 0.001]"]),
        ("tuned_hyperparameters: {trials: 0}\n", ["tuned_hyperparameters.trials", "greater than or equal to 1"]),
    ],
    ids=[
        "zero epochs", "negative epochs", "unknown setting", "unknown asset", "entry not a mapping", "broken yaml",
        "list at top level", "one class", "bad class name", "duplicate class", "tiny resolution",
        "unknown backbone", "unknown recipe", "growing crops without crops", "reversed search range", "no trials",
    ],
)
def test_malformed_settings_are_refused_before_anything_runs(home: Path, tmp_path: Path, capsys, text: str, expected: list[str]):
    settings = tmp_path / "settings.yaml"
    settings.write_text(text)

    assert run_cli("run", "--config", str(settings)) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"flywheel run: {settings}: ")
    for fragment in expected:
        assert fragment in err
    assert not (home / "warehouse.duckdb").exists() and not (home / "registry").exists()


def test_a_missing_settings_file_is_named(home: Path, tmp_path: Path, capsys):
    missing = tmp_path / "no-such-settings.yaml"
    assert run_cli("run", "--config", str(missing)) == 2
    assert f"flywheel run: {missing}: not a readable YAML file" in capsys.readouterr().err
    assert not (home / "warehouse.duckdb").exists() and not (home / "registry").exists()


# --- 2. unknown drift kind ---------------------------------------------------------------------

def test_an_unknown_drift_kind_is_refused_with_the_allowed_kinds(home: Path, capsys):
    assert run_cli("simulate", "--drift", "sideways") == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err

    with pytest.raises(ValueError) as refused:
        SimulationSpec(drift="sideways")
    message = str(refused.value)
    assert "unknown drift kind 'sideways'" in message
    assert all(kind in message for kind in DRIFT_KINDS)
    assert not (home / "landing").exists()


# --- 3. empty landing zone ---------------------------------------------------------------------

def test_a_tick_on_an_empty_landing_zone_says_nothing_has_landed(home: Path, capsys):
    assert run_cli("run") == 0
    assert f"nothing has landed in {home.resolve() / 'landing'} yet: put batch files there" in capsys.readouterr().out
    assert not (home / "warehouse.duckdb").exists() and not (home / "registry").exists()


# --- 4. a champion pointer naming a missing version -------------------------------------------

def except_pointer_and_history(hashes: dict[str, str]) -> dict[str, str]:
    """The files a rollback must not touch."""
    return {name: digest for name, digest in hashes.items() if name not in (CHAMPION_FILE, HISTORY_FILE)}


def test_a_pointer_to_a_missing_version_is_reported_then_repaired_by_rollback(
    registry: Registry, home: Path, image: Path, tmp_path: Path, capsys
):
    pointer = registry.root / CHAMPION_FILE
    pointer.write_text("v0009\n")
    before = file_hashes(registry.root)
    output = tmp_path / "out.csv"

    for command in (["status"], ["predict", str(image), "--output", str(output)], ["run"]):
        assert run_cli(*command) == 2, command
        err = capsys.readouterr().err
        assert f"flywheel {command[0]}: the champion pointer {pointer} names 'v0009'" in err
        assert "v0009 is not in the registry" in err
    assert file_hashes(registry.root) == before
    assert not output.exists() and not (home / "warehouse.duckdb").exists()

    assert run_cli("rollback", "--to", "v0001") == 0
    assert "champion: v0009 -> v0001" in capsys.readouterr().out
    assert registry.champion().version == "v0001"
    assert except_pointer_and_history(file_hashes(registry.root)) == except_pointer_and_history(before)
    assert run_cli("status") == 0
    assert "champion: v0001" in capsys.readouterr().out


# --- 5. a corrupted champion -------------------------------------------------------------------

def garble_int8_model(version_dir: Path) -> Path:
    path = version_dir / "model.int8.onnx"
    path.write_bytes(b"\x00garbage, not protobuf\xff" * 40)
    return path


def truncate_weights(version_dir: Path) -> Path:
    path = version_dir / "weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize(
    "corrupt, reason",
    [(garble_int8_model, "is not a loadable ONNX model"), (truncate_weights, "is not readable safetensors")],
    ids=["garbage int8 model", "truncated weights"],
)
def test_a_tick_with_a_corrupted_champion_stops_and_points_to_rollback(registry: Registry, home: Path, capsys, corrupt, reason):
    damaged = corrupt(registry.root / "v0001")
    simulate_batches(home / "landing", SimulationSpec(batches=1, batch_size=10))
    before = file_hashes(registry.root)

    assert run_cli("run") == 2

    err = capsys.readouterr().err
    assert f"flywheel run: v0001: {damaged} {reason}" in err
    assert "restore a good champion with `flywheel rollback --to VERSION`" in err
    assert file_hashes(registry.root) == before
    assert not (home / "warehouse.duckdb").exists()  # the landed batch was not ingested either


def test_predict_with_a_garbage_champion_model_says_it_is_not_loadable(registry: Registry, image: Path, tmp_path: Path, capsys):
    damaged = garble_int8_model(registry.root / "v0001")
    before = file_hashes(registry.root)
    output = tmp_path / "out.csv"

    assert run_cli("predict", str(image), "--output", str(output)) != 0

    assert f"{damaged} is not a loadable ONNX model" in capsys.readouterr().err
    assert not output.exists()
    assert file_hashes(registry.root) == before


# --- 6. ONNX files that are not a servable model -----------------------------------------------

def rename_model_input(version_dir: Path) -> Path:
    """A valid ONNX graph with the wrong contract: its input is `x`, not `image`."""
    path = version_dir / "model.onnx"
    model = onnx.load(str(path))
    model.graph.input[0].name = "x"
    model.graph.node[0].input[0] = "x"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def replace_int8_model_with_text(version_dir: Path) -> Path:
    path = version_dir / "model.int8.onnx"
    path.write_text("this is a model, honestly\n")
    return path


@pytest.mark.parametrize(
    "spoil, reason",
    [(rename_model_input, "takes ['x'] and returns ['logits'], not image -> logits"),
     (replace_int8_model_with_text, "is not a loadable ONNX model")],
    ids=["wrong input name", "plain text int8 model"],
)
def test_a_version_that_is_not_servable_is_never_promoted(registry: Registry, capsys, spoil, reason):
    staging = write_servable_files(registry.staging_dir("bad"))
    spoiled_name = spoil(staging).name
    bad = registry.publish(staging, model_card())
    before = file_hashes(registry.root)

    with pytest.raises(RegistryError) as refused:
        registry.promote(bad.version, "test")
    assert str(refused.value).startswith(f"{bad.version}: {bad.path / spoiled_name} {reason}")
    assert registry.champion_pointer() == "v0001"

    assert run_cli("rollback", "--to", bad.version) == 2
    assert reason in capsys.readouterr().err
    assert registry.champion_pointer() == "v0001"
    assert file_hashes(registry.root) == before


# --- 7. a landing file still being copied ------------------------------------------------------

def stored_batches(home: Path) -> dict[str, int]:
    """Accepted rows per batch in the warehouse."""
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as connection:
        return dict(connection.execute("SELECT batch_id, count(*) FROM raw_images GROUP BY batch_id").fetchall())


@pytest.fixture
def instance(home: Path):
    with get_instance(home) as instance:
        yield instance


def test_a_landing_file_still_being_copied_fails_alone_and_is_ingested_once_complete(home: Path, instance):
    from orchestration.definitions import defs

    # Resolved like the data root the job reads, so the path in its message compares equal.
    (_, copying), _ = simulate_batches(home.resolve() / "landing", SimulationSpec(batches=2, batch_size=20))
    whole = copying.read_bytes()
    copying.write_bytes(whole[: len(whole) // 2])
    instance.add_dynamic_partitions("batches", ["digits-000", "digits-001"])
    ingest = defs.resolve_job_def("ingest")

    def ingest_batch(batch: str):
        return ingest.execute_in_process(instance=instance, partition_key=batch, raise_on_error=False)

    assert ingest_batch("digits-000").success
    stored = warehouse_snapshot(home / "warehouse.duckdb")

    result = ingest_batch("digits-001")
    assert not result.success
    assert failure_message(result).startswith(f"{copying}: not a readable parquet file: it ends before the parquet footer")
    assert warehouse_snapshot(home / "warehouse.duckdb") == stored
    assert stored_batches(home) == {"digits-000": 20}

    copying.write_bytes(whole)
    assert ingest_batch("digits-001").success
    assert stored_batches(home) == {"digits-000": 20, "digits-001": 20}


def test_hidden_copies_in_progress_are_not_landed_files(home: Path):
    landing = home / "landing"
    (complete,), _ = simulate_batches(landing, SimulationSpec(batches=1, batch_size=5))
    (landing / ".digits-009.parquet.partial").write_bytes(complete.read_bytes()[:100])
    (landing / ".x.parquet").write_bytes(complete.read_bytes())
    assert landed_files(landing) == [complete]
