import os
import signal
import subprocess
from pathlib import Path

import pytest

# Tests never touch the user's W&B account or data root.
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
# Under pytest-xdist (`make test`: two test files at a time) each worker, and every process it starts,
# gets its share of the cores for PyTorch's threads, so two trainings do not oversubscribe the cores
# with OpenMP threads that spin while they wait (a loop test then took ~2.4x its time alone, not ~1.2x).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


def stored_datasets(home: Path, digits_splits: dict) -> dict:
    """`ffcv_datasets`' value for the digits splits (the fixture's sizes), as the asset would have stored it."""
    import json

    import dagster as dg

    from orchestration.io_manager import value_path
    from orchestration.resources import FlywheelHome

    datasets = {
        "dir": str(digits_splits["dir"]), "classes": [str(digit) for digit in range(10)], "resolution": 32,
        "splits": {"train": {"batches": ["digits"], "examples": 400}, "val": {"examples": 100}},
    }
    stored = value_path(FlywheelHome(home=str(home)), dg.AssetKey("ffcv_datasets"), None)
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps(datasets))
    return datasets


@pytest.fixture
def training_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_splits: dict) -> Path:
    """A data root whose `ffcv_datasets` is the digits splits (`stored_datasets`), and a Dagster home
    beside it: for materializing `trained_model` alone."""
    home = tmp_path / "flywheel"
    home.mkdir()
    stored_datasets(home, digits_splits)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    return home


def materialize_training(home: Path, compute, config: dict, raise_on_error: bool = True):
    """`trained_model` materialized on `stored_datasets`' value, on `compute` (a TrainingCompute)."""
    import dagster as dg

    from orchestration.assets.datasets import ffcv_datasets
    from orchestration.assets.training import trained_model

    return dg.materialize(
        [ffcv_datasets, trained_model], selection=["trained_model"], resources=resources_for(home) | {"compute": compute},
        run_config={"ops": {"trained_model": {"config": config}}}, raise_on_error=raise_on_error,
    )


# Small and fast, yet enough to learn the digits: used by every test that trains. Batches of 32 at
# the default 3e-3 (reference_batch 32: no linear down-scaling), the rate these tests were tuned at;
# at 1.5e-3 the retrained candidate of test_loop is underconfident and fails the calibration gate.
FAST_TRAINING = {"epochs": 10, "batch_size": 32, "reference_batch": 32}
# For tests about the loop, not the gate (test_gate is): a first model trained with FAST_TRAINING on 280
# digits scores about 0.9 on ~56 test images, and scored 0.875 against the 0.9 floor in three of a
# session's runs (test_idempotency once, test_loop twice), so the first champion is admitted whatever it scores.
ADMIT_FIRST_MODEL = {"absolute_floor": 0.0}


@pytest.fixture(scope="session")
def digits_splits(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real digits at 32x32 as FFCV datasets (train/val/test), without the warehouse in between."""
    import numpy as np
    from PIL import Image

    from training.data import write_beton
    from transforms.simulate import digits_pool

    _, images, labels = digits_pool("all")
    upscaled = np.stack(
        [np.asarray(Image.fromarray(i, mode="L").resize((32, 32), Image.Resampling.BILINEAR)) for i in images[:600]]
    )
    rgb = np.repeat(upscaled[:, :, :, None], 3, axis=3)
    labels = labels[:600]
    folder = tmp_path_factory.mktemp("ffcv")
    cuts = {"train": slice(0, 400), "val": slice(400, 500), "test": slice(500, 600)}
    for split, rows in cuts.items():
        write_beton(folder / f"{split}.beton", rgb[rows], labels[rows])
    return {"dir": folder, "images": {s: rgb[r] for s, r in cuts.items()}, "labels": {s: labels[r] for s, r in cuts.items()}}


@pytest.fixture(scope="session")
def trained_weights(digits_splits: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small classifier trained in-process once for the tests that need a model."""
    from training.config import FitConfig, ModelConfig, OptimConfig
    from training.fit import fit

    root = tmp_path_factory.mktemp("fit")
    result = fit(
        FitConfig(
            beton_dir=digits_splits["dir"], run_dir=root / "run", wandb_save_dir=root,
            model=ModelConfig(width=32), optim=OptimConfig(epochs=6, batch_size=32, reference_batch=32),
        )
    )
    return Path(result.weights_path)


SERVABLE_RESOLUTION = 8  # the smallest a card's model may declare


def model_card(
    *, training_batches: tuple[str, ...] = ("digits-000",), test_accuracy: float = 0.9, resolution: int = SERVABLE_RESOLUTION,
    parent_champion: str | None = None,
):
    """A complete, valid model card with plausible figures, for versions the tests publish by hand."""
    from training.card import CardGates, CardMetrics, ExportSummary, GateVerdict, InputSpec, Lineage, ModelCard
    from training.config import ModelConfig
    from training.results import ExportGatePolicy
    from training.gate import GateDecision

    passed = GateDecision(passed=True, reasons=["published by a test"], model="fp32")
    return ModelCard(
        created_at="2026-01-01T00:00:00Z",
        class_names=[str(index) for index in range(10)],
        input=InputSpec(height=resolution, width=resolution),
        model=ModelConfig(resolution=resolution),
        metrics=CardMetrics(
            test_accuracy=test_accuracy, test_macro_f1=test_accuracy, test_ece=0.02, test_examples=100,
            test_accuracy_onnx_fp32=test_accuracy, test_accuracy_int8=test_accuracy, test_ece_int8=0.02,
            val_accuracy=test_accuracy, per_batch={},
        ),
        export=ExportSummary(
            fp32_bytes=1000, int8_bytes=300, parity_max_abs_diff=0.0, exporter="test", int8_recipe="test",
            int8_recipe_trials=[], settings=ExportGatePolicy(max_accuracy_drop=0.01, max_size_ratio=0.3, max_parity_diff=1e-3),
        ),
        gates=CardGates(evaluation=passed, export=GateVerdict(passed=True, reasons=[]), served=passed.model_copy(update={"model": "int8"})),
        lineage=Lineage(
            training_batches=list(training_batches), training_attempt="test", parent_champion=parent_champion,
            compared_with_champion=parent_champion, code_version="test", wandb_run_id="offline-test",
            dagster_run_id="test", inputs_fingerprint="test",
        ),
    )


def write_servable_files(folder: Path, logits_bias: float = 0.0) -> Path:
    """The three model files of a registry version, tiny but real: ONNX graphs that ONNX Runtime serves
    under the contract (uint8 `image` [N, 8, 8, 3] -> float `logits` [N, 10]) and safetensors."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.torch import save_file

    side = SERVABLE_RESOLUTION
    weights = np.full((side * side * 3, 10), 0.01, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["pixels"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", side, side, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(np.full(10, logits_bias, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for name in ("model.onnx", "model.int8.onnx"):
        onnx.save(model, str(folder / name))
    save_file({"weights": torch.from_numpy(weights)}, str(folder / "weights.safetensors"))
    return folder


def stop_process_group(process: subprocess.Popen, grace: float) -> None:
    """Stop a server started with `start_new_session=True` and everything it started: SIGTERM first,
    so it shuts down as it would for a user; SIGKILL to the whole group after `grace` seconds, so
    nothing it started outlives the test and loads the rest of the suite."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
