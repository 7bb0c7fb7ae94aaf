"""The Dagster UI in a real browser (Playwright driving Debian's Chromium): `make dev`'s webserver
and daemon on a free port, the asset graph with every asset key, a materialization launched from
the UI, its run, and the champion's metadata. Screenshots land in the test's tmp dir."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from orchestration.instance import dagster_home
from tests.conftest import ADMIT_FIRST_MODEL, FAST_TRAINING, stop_process_group
from tests.test_pipeline_e2e import DESIGN_ASSET_KEYS
from transforms.simulate import SimulationSpec, simulate_batches

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_champion(home: Path) -> None:
    """Land two batches and run the loop's jobs on the instance the UI will show."""
    from orchestration.definitions import defs

    instance = dg.DagsterInstance.get()
    landed, _ = simulate_batches(home / "landing", SimulationSpec(batches=2, batch_size=150, seed=3))
    instance.add_dynamic_partitions("batches", [p.stem for p in landed])
    for path in landed:
        assert defs.resolve_job_def("ingest").execute_in_process(instance=instance, partition_key=path.stem).success
    assert defs.resolve_job_def("transform").execute_in_process(instance=instance).success
    # The UI needs a champion, fast: 60 steps on ~210 images are too few for augmentation to pay off
    # (with the default shifts the first model scored 0.857 against the 0.9 floor). This test is about
    # the UI, not the gate: the floor admits this first model whatever it scores on ~56 test images
    # (without shifts it scored 0.893 once; the gate is tested in tests/test_gate.py).
    retrain = defs.resolve_job_def("retrain").execute_in_process(
        instance=instance, run_config={"ops": {
            "trained_model": {"config": {**FAST_TRAINING, "recipe": "none"}},
            "model_evaluation": {"config": ADMIT_FIRST_MODEL},
        }},
    )
    assert retrain.success


@pytest.fixture
def dagster_dev(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home(home)))
    monkeypatch.setenv("FLYWHEEL_AUTOMATION", "stopped")  # runs in this test are the ones it launches
    prepare_champion(home)
    port = free_port()
    log = open(home / "dagster_dev.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 360  # hang guards: another test file runs beside this one
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/server_info", timeout=2)
            break
        except OSError:
            assert process.poll() is None, (home / "dagster_dev.log").read_text()[-3000:]
            time.sleep(1)
    else:
        pytest.fail("dagster dev did not come up within 180 s")
    yield url
    stop_process_group(process, grace=30)
    log.close()


def dismiss_community_dialog(page) -> None:
    """A fresh instance greets its first visitor with a newsletter dialog."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except Exception:  # no dialog this time
        pass


def test_the_ui_shows_the_graph_launches_a_run_and_shows_the_champion(dagster_dev: str, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        # Tall enough that the catalog's virtualised list renders every row.
        page = browser.new_page(viewport={"width": 1600, "height": 2400})
        page.set_default_timeout(60_000)

        # Every asset key of DESIGN.md is in the catalog; the graph renders.
        page.goto(f"{dagster_dev}/assets")
        dismiss_community_dialog(page)
        for key in sorted(DESIGN_ASSET_KEYS):
            expect(page.get_by_text(key, exact=True).first).to_be_visible()
        page.screenshot(path=shots / "1-asset-catalog.png", full_page=True)
        page.goto(f"{dagster_dev}/asset-groups")
        dismiss_community_dialog(page)
        page.wait_for_timeout(3000)
        # The global lineage: the six owner groups, in the order the data flows.
        for group in ("ingestion", "transformation", "training", "evaluation", "deployment", "monitoring"):
            expect(page.get_by_text(group, exact=True).first).to_be_visible()
        page.screenshot(path=shots / "2-asset-graph.png")

        # Sensors and the schedule are there.
        page.goto(f"{dagster_dev}/automation")
        for name in ("landing_sensor", "transform_on_ingestion", "monitoring_sensor", "drift_sensor", "retraining_schedule"):
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        page.screenshot(path=shots / "3-automation.png")

        # Launch a materialization from the UI and wait for its run to succeed.
        page.goto(f"{dagster_dev}/assets/raw_labels")
        page.wait_for_timeout(3000)
        page.screenshot(path=shots / "4-asset-raw_labels.png")
        page.get_by_text("Materialize", exact=True).first.click()
        page.wait_for_timeout(3000)
        # The daemon dequeues the run and launches it; follow it in the instance the UI reads.
        instance = dg.DagsterInstance.get()
        launched = None
        deadline = time.monotonic() + 480
        while launched is None or launched.dagster_run.status not in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE):
            assert time.monotonic() < deadline, f"the launched run did not finish in time: {launched and launched.dagster_run.status}"
            time.sleep(2)
            records = instance.get_run_records(dg.RunsFilter(tags={}), limit=20)
            launched = next((r for r in records if dg.AssetKey("raw_labels") in (r.dagster_run.asset_selection or set())), None)
        assert launched.dagster_run.status == dg.DagsterRunStatus.SUCCESS
        page.goto(f"{dagster_dev}/runs")
        page.screenshot(path=shots / "5-runs.png")
        page.goto(f"{dagster_dev}/runs/{launched.dagster_run.run_id}")
        expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible()
        page.screenshot(path=shots / "6-run.png")

        # The champion's materialization metadata.
        page.goto(f"{dagster_dev}/assets/champion_model")
        expect(page.get_by_text("v0001").first).to_be_visible()
        # Formatted for people: an accuracy as a percentage with its interval, not a float of 16 digits.
        expect(page.get_by_text(re.compile(r"\d+\.\d\d % \(95% CI \d+\.\d-\d+\.\d %, \d+ images\)")).first).to_be_visible()
        page.screenshot(path=shots / "7-champion.png", full_page=True)
        browser.close()
    assert len(list(shots.glob("*.png"))) == 7
    print(f"screenshots in {shots}")
