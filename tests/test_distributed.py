"""DDP on the CPU (gloo, 2 processes) through the very launcher the `trained_model` asset uses."""

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import hashlib

import numpy as np
import pytest

from orchestration.resources import TrainingCompute
from training.config import RESULT_FILE, ComputeConfig, FitConfig, ModelConfig, OptimConfig
from training.data import write_beton
from training.distributed_run import FAILURE_FILE_ENV
from training.inference import load_classifier, predict_torch
from training.tracking import find_offline_run, read_offline_run


def launch(compute: TrainingCompute, config: FitConfig, tmp_path: Path) -> dict:
    config_path = tmp_path / f"{config.run_name}.json"
    config_path.write_text(config.model_dump_json())
    completed = subprocess.run(compute.torchrun_command(config_path), capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((config.run_dir / RESULT_FILE).read_text())


def test_ddp_with_two_cpu_processes_shards_the_data_and_learns_as_well(digits_splits: dict, tmp_path: Path):
    # An odd validation split: two ranks cannot hold equal halves, so a padded duplicate would show.
    betons = tmp_path / "betons"
    betons.mkdir()
    for split in ("train", "test"):
        (betons / f"{split}.beton").symlink_to(digits_splits["dir"] / f"{split}.beton")
    val_images = np.concatenate([digits_splits["images"]["val"], digits_splits["images"]["test"][:1]])
    val_labels = np.concatenate([digits_splits["labels"]["val"], digits_splits["labels"]["test"][:1]])
    write_beton(betons / "val.beton", val_images, val_labels)

    def config(name: str, compute: TrainingCompute, batch_size: int) -> FitConfig:
        return FitConfig(
            beton_dir=betons, run_dir=tmp_path / name, wandb_save_dir=tmp_path, run_name=name,
            model=ModelConfig(width=16), optim=OptimConfig(epochs=10, batch_size=batch_size),
            compute=ComputeConfig(**compute.compute_config()), audit_examples=True,
        )

    single_compute = TrainingCompute(accelerator="cpu", devices="1", num_workers=1)
    ddp_compute = TrainingCompute(accelerator="cpu", devices="2", num_workers=1)
    assert "--nproc-per-node=2" in ddp_compute.torchrun_command(Path("x.json"))
    assert ddp_compute.compute_config()["strategy"] == "ddp"

    # Same global batch (32) and so the same number of optimizer steps in both runs.
    single = launch(single_compute, config("single", single_compute, 32), tmp_path)
    ddp = launch(ddp_compute, config("ddp", ddp_compute, 16), tmp_path)

    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["global_step"] == single["global_step"]
    rank0 = json.loads((tmp_path / "ddp" / "audit" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "ddp" / "audit" / "rank1.json").read_text())
    train_digests = Counter(hashlib.sha1(i.tobytes()).hexdigest() for i in digits_splits["images"]["train"])
    repeated = {d for d, n in train_digests.items() if n > 1}  # identical scans may fall to either rank
    assert len(rank0) == len(rank1) >= 190  # each rank a half of the 400 training images
    assert not (set(rank0) & set(rank1)) - repeated
    assert set(rank0) | set(rank1) <= set(train_digests)
    assert ddp["val_accuracy"] >= single["val_accuracy"] - 0.05, (ddp, single)
    assert ddp["val_accuracy"] >= 0.85
    # Exact validation under DDP: the two ranks' 51 + 50 examples, each counted once, give the
    # accuracy of the same weights on the whole split in one process.
    network = load_classifier(Path(ddp["weights_path"]), ModelConfig(width=16))
    in_one_process = float((predict_torch(network, val_images).argmax(axis=1) == val_labels).mean())
    assert ddp["val_accuracy"] == pytest.approx(in_one_process, abs=1e-6), (ddp["val_accuracy"], in_one_process)


def test_the_offline_wandb_run_holds_config_history_and_summary(trained_weights: Path):
    result = json.loads((trained_weights.parent / RESULT_FILE).read_text())
    wandb_dir = trained_weights.parent.parent / "wandb"
    run = read_offline_run(find_offline_run(wandb_dir, result["wandb_run_id"]))
    assert run.config["optim"]["epochs"] == 6 and run.config["model"]["width"] == 32
    val_accuracy = [row["val/accuracy"] for row in run.history if "val/accuracy" in row]
    train_loss = [row["train/loss"] for row in run.history if "train/loss" in row]
    assert len(val_accuracy) == 6 and len(train_loss) == 6
    assert train_loss[-1] < train_loss[0]
    assert np.isclose(run.summary["best/val_accuracy"], result["val_accuracy"])


def test_a_worker_that_crashes_natively_fails_in_one_line_naming_the_signal(tmp_path: Path):
    worker = tmp_path / "crash.py"
    worker.write_text("import ctypes\nctypes.string_at(0)  # reads address 0: SIGSEGV\n")
    failure_file = tmp_path / "failure.txt"
    command = TrainingCompute(accelerator="cpu", devices="1").torchrun_command(Path("x.json"))
    launcher = command[: command.index("-m", 2)] + [str(worker)]  # the launcher's flags, our worker
    completed = subprocess.run(
        launcher, capture_output=True, text=True, timeout=120, env={**os.environ, FAILURE_FILE_ENV: str(failure_file)}
    )
    assert completed.returncode == 1
    line = completed.stderr.strip().splitlines()[-1]
    assert line.startswith("training worker rank 0 (pid ") and "killed by signal SIGSEGV (11): a native crash" in line, line
    assert failure_file.read_text().strip() == line


def test_a_worker_exception_fails_in_one_line_naming_it(tmp_path: Path):
    config = FitConfig(beton_dir=tmp_path / "missing", run_dir=tmp_path / "run", wandb_save_dir=tmp_path)
    config_path = tmp_path / "fit.json"
    config_path.write_text(config.model_dump_json())
    completed = subprocess.run(
        TrainingCompute(accelerator="cpu", devices="1").torchrun_command(config_path), capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 1
    line = completed.stderr.strip().splitlines()[-1]
    assert line.endswith(f"exited with code 1: FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path}/missing/train.beton'"), line
