import os
from pathlib import Path

import pytest

# Tests never touch the user's W&B account or data root.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data root, exported as FLYWHEEL_HOME the way the CLI and dbt read it."""
    root = tmp_path / "flywheel"
    root.mkdir()
    monkeypatch.setenv("FLYWHEEL_HOME", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return root


def resources_for(root: Path) -> dict:
    from orchestration.assets.transformation import dbt_resource
    from orchestration.io_manager import JsonIOManager
    from orchestration.resources import FlywheelHome, TrainingCompute

    flywheel = FlywheelHome(home=str(root))
    return {
        "flywheel": flywheel,
        "compute": TrainingCompute(num_workers=1),
        "dbt": dbt_resource(),
        "io_manager": JsonIOManager(flywheel=flywheel),
    }


# Small and fast, yet enough to learn the digits: used by every test that trains.
FAST_TRAINING = {"epochs": 4, "width": 8, "batch_size": 32, "learning_rate": 5e-3}
