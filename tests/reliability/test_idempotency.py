"""Re-running any asset with unchanged inputs leaves the warehouse, the FFCV files and the registry
exactly as they were: same tables (row counts and content hashes), same files (sha256)."""

from pathlib import Path

import dagster as dg
import pytest
import yaml

from orchestration.definitions import defs
from orchestration.instance import get_instance
from flywheel.loop import run_tick
from orchestration.resources import FlywheelHome
from tests.conftest import ADMIT_FIRST_MODEL, FAST_TRAINING
from tests.reliability.conftest import file_hashes, warehouse_snapshot
from transforms.simulate import SimulationSpec, simulate_batches

pytestmark = pytest.mark.e2e

SETTINGS = {"trained_model": FAST_TRAINING, "model_evaluation": ADMIT_FIRST_MODEL}
RERUNS = [
    ("key:raw_images or key:quarantined_images", "digits-000"),
    ("key:raw_images or key:quarantined_images", "digits-001"),
    ("key:raw_labels", None),
    ("key:stg_images or key:stg_labels or key:int_images or key:training_examples or key:batch_image_stats", None),
    ("key:ffcv_datasets", None),
    ("key:trained_model", None),
    ("key:model_evaluation", None),
    ("key:exported_model", None),
    ("key:champion_model", None),
    ("key:drift_report", "digits-001"),
]


def stored(home: Path) -> dict:
    return {
        "warehouse": warehouse_snapshot(home / "warehouse.duckdb"),
        "ffcv": file_hashes(home / "ffcv"),
        "registry": file_hashes(home / "registry"),
    }


def test_rerunning_every_asset_changes_nothing_stored(home: Path):
    simulate_batches(home / "landing", SimulationSpec(batches=2, batch_size=200, seed=3))
    instance = get_instance(home)
    (home / "flywheel.yaml").write_text(yaml.safe_dump(SETTINGS))
    report = run_tick(defs, instance, FlywheelHome(home=str(home)), log=lambda _: None)
    assert report.champion_after == "v0001" and not report.failed
    before = stored(home)
    assert before["warehouse"]["raw_images"][0] == 400 and before["ffcv"] and before["registry"]

    run_config = {"ops": {name: {"config": values} for name, values in SETTINGS.items()}}
    for selection, partition in RERUNS:
        ops = {o for o in run_config["ops"] if o in selection}
        result = dg.materialize(
            list(defs.assets), selection=selection, partition_key=partition, instance=instance, resources=defs.resources,
            run_config={"ops": {o: run_config["ops"][o] for o in ops}}, raise_on_error=False,
        )
        assert result.success, selection
        after = stored(home)
        for store in before:
            assert after[store] == before[store], f"re-running {selection} ({partition}) changed the {store}"
