import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from training.config import ComputeConfig, FitConfig, ModelConfig, OptimConfig
from training.data import loader_threads, read_beton
from training import evaluate
from training.evaluate import classification_metrics
from training.inference import load_classifier, predict_torch
from training.fit import fit, resolve_precision
from training.backbones import build_network
from training.tracking import find_offline_run, read_offline_run


def test_beton_round_trip_keeps_pixels_and_labels(digits_splits: dict):
    images, labels = read_beton(digits_splits["dir"] / "test.beton")
    np.testing.assert_array_equal(images, digits_splits["images"]["test"])
    np.testing.assert_array_equal(labels, digits_splits["labels"]["test"])


def test_the_test_set_streams_from_the_beton_a_batch_at_a_time_and_checks_its_index(digits_splits: dict, tmp_path: Path):
    beton, labels = digits_splits["dir"] / "test.beton", digits_splits["labels"]["test"]
    index = tmp_path / "test.index.parquet"
    pl.DataFrame({"label": labels, "batch_id": [f"b{i % 3}" for i in range(len(labels))]}).write_parquet(index)
    test = evaluate.TestSet.load(beton, index)
    assert [len(batch) for batch in test.image_batches(32)] == [32, 32, 32, len(labels) - 96]
    network = build_network(ModelConfig(width=8)).eval()
    streamed, doubled = test.logits(lambda images: predict_torch(network, images), lambda images: 2 * predict_torch(network, images), batch_size=32)
    np.testing.assert_allclose(streamed, predict_torch(network, digits_splits["images"]["test"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(doubled, 2 * streamed, rtol=1e-6)
    assert test.slices.tolist()[:4] == ["b0", "b1", "b2", "b0"]
    held = test.in_memory()  # for the int8 search's many passes: the same images, labels and slices, read once
    np.testing.assert_array_equal(np.concatenate(list(held.image_batches(50))), digits_splits["images"]["test"])
    assert held.labels is test.labels and held.slices is test.slices

    pl.DataFrame({"label": labels[:-1], "batch_id": ["b"] * (len(labels) - 1)}).write_parquet(index)
    with pytest.raises(ValueError, match=f"describes {len(labels) - 1} examples but .*test.beton holds {len(labels)}"):
        evaluate.TestSet.load(beton, index)


def test_network_takes_uint8_nhwc_and_returns_logits():
    network = build_network(ModelConfig(width=8, num_classes=7, resolution=16)).eval()
    logits = network(torch.zeros((3, 16, 16, 3), dtype=torch.uint8))
    assert logits.shape == (3, 7) and logits.dtype == torch.float32


def test_a_warm_start_keeps_the_shared_layers_and_grows_the_head_for_a_new_class():
    from training.fit import warm_start

    champion = build_network(ModelConfig(width=8, num_classes=2, resolution=16))
    grown = build_network(ModelConfig(width=8, num_classes=3, resolution=16))
    fresh = warm_start(grown, champion.state_dict())
    assert fresh == ["head.bias", "head.weight"]
    shared = [name for name in champion.state_dict() if not name.startswith("head.")]
    assert shared and all(torch.equal(grown.state_dict()[n], champion.state_dict()[n]) for n in shared)
    assert grown.head.weight.shape == (3, 32)


# Every width below 8 (where oneDNN's kernels change with the channel count), the usual ones, and
# resolutions at which the nhwc kernel bug of torch 2.13 showed up (see training/model.py).
WIDTHS = [*range(4, 13), 16, 24, 32, 48, 64]
RESOLUTIONS = [32, 64]


def test_every_width_trains_on_cpu_without_a_native_crash():
    configurations = [[width, resolution] for width in WIDTHS for resolution in RESOLUTIONS]
    command = [sys.executable, "-X", "faulthandler", "-m", "tests.training_steps", json.dumps(configurations)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=180)
        stdout, outcome = completed.stdout, (
            f"died of {signal.Signals(-completed.returncode).name}" if completed.returncode < 0 else f"exited {completed.returncode}"
        )
    except subprocess.TimeoutExpired as timeout:  # a hang; subprocess.run SIGKILLs the child
        stdout, outcome = (timeout.stdout or b"").decode(), "hung for 180 s"
    done = [[int(w), int(r)] for _, w, r in (line.split() for line in stdout.splitlines() if line.startswith("ok "))]
    if done != configurations:
        failing = configurations[len(done)]
        pytest.fail(f"training width {failing[0]} at {failing[1]} px {outcome}")


def test_loader_threads_share_the_cores_between_a_nodes_processes(monkeypatch: pytest.MonkeyPatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_threads(None) == cores and loader_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more processes than cores: one thread each
    assert loader_threads(None) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_threads(None) == cores


def test_cpu_precision_defaults_to_32_true():
    assert resolve_precision(ComputeConfig(accelerator="cpu")) == "32-true"
    assert resolve_precision(ComputeConfig(precision="bf16-mixed")) == "bf16-mixed"


def test_trained_model_learns_the_digits(trained_weights: Path, digits_splits: dict):
    network = load_classifier(trained_weights, ModelConfig(width=32))
    logits = predict_torch(network, digits_splits["images"]["test"])
    metrics = classification_metrics(logits, digits_splits["labels"]["test"], 10)
    assert metrics.accuracy >= 0.9
    result = json.loads((trained_weights.parent / "result.json").read_text())
    assert result["epochs_completed"] == 6 and result["world_size"] == 1 and result["precision"] == "32-true"
    # Defaults on a CPU: no torch.compile, and the loader takes every core this process may use.
    assert result["compiled"] is False and result["loader_threads"] == len(os.sched_getaffinity(0))
    assert result["wandb_run_id"]
    # Throughput from the second batch on; the first (numba compilation, kernel selection) is warm-up.
    assert result["warmup_seconds"] > 0 and 0 < result["images_per_s"] <= result["step_images_per_s"]
    assert 0 <= result["loader_wait_share"] < 1
    run = read_offline_run(find_offline_run(trained_weights.parent.parent / "wandb", result["wandb_run_id"]))
    per_epoch = [row["throughput/images_per_s"] for row in run.history if "throughput/images_per_s" in row]
    assert len(per_epoch) == 6 and min(per_epoch) > 0


def test_a_killed_training_resumes_from_its_last_checkpoint(digits_splits: dict, tmp_path: Path):
    config = FitConfig(
        beton_dir=digits_splits["dir"], run_dir=tmp_path / "run", wandb_save_dir=tmp_path,
        model=ModelConfig(width=8), optim=OptimConfig(epochs=30, batch_size=50),
        compute=ComputeConfig(num_workers=1),
    )
    config_path = tmp_path / "fit.json"
    config_path.write_text(config.model_dump_json())
    process = subprocess.Popen([sys.executable, "-m", "training.fit", str(config_path)], stderr=subprocess.DEVNULL)
    last = config.run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let the checkpoint's rename land
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"

    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < 30 * 8
    result = fit(config)
    assert result.resumed_from_step == killed_at
    assert result.global_step == 30 * 8  # 400 examples / 50 per batch = 8 steps per epoch
    assert result.val_accuracy > 0.5
    # last.ckpt is the last epoch's, not the best one's: the finished attempt, launched again (a job
    # retried after its export failed), trains no further step and keeps the same best weights.
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 30 * 8
    again = fit(config)
    assert again.resumed_from_step == again.global_step == 30 * 8
    assert again.best_checkpoint == result.best_checkpoint and again.val_accuracy == result.val_accuracy


def test_metrics_per_class_confusion_and_slices():
    logits = np.eye(3)[[0, 1, 2, 2]] * 5.0
    labels = np.array([0, 1, 2, 1])
    result = classification_metrics(logits, labels, 3, slices=np.array(["x", "x", "y", "y"]))
    assert result.accuracy == pytest.approx(0.75)
    assert result.confusion == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert {name: (m["count"], m["accuracy"], round(m["macro_f1"], 4)) for name, m in result.slices.items()} == {
        "x": (2, 1.0, 1.0), "y": (2, 0.5, 0.3333),
    }
    assert result.slices["x"]["ece"] < result.slices["y"]["ece"]
    assert result.per_class[1] == {"class": 1, "precision": 1.0, "recall": 0.5, "support": 2}


def test_the_learning_rate_scales_with_the_global_batch_and_the_backbone_gets_its_ratio():
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from training.model import LitClassifier

    images = torch.randint(0, 256, (64, 16, 16, 3), dtype=torch.uint8)
    module = LitClassifier(
        ModelConfig(width=8, resolution=16).model_dump(),
        OptimConfig(batch_size=16, schedule="constant", learning_rate=3e-3, reference_batch=64, backbone_lr_ratio=0.1).model_dump(),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images, torch.randint(0, 10, (64,))), batch_size=16))
    head, backbone = trainer.optimizers[0].param_groups
    assert head["lr"] == pytest.approx(3e-3 * ((16 * 2) / 64) ** 0.5) and backbone["lr"] == pytest.approx(head["lr"] * 0.1)  # AdamW: square root
    assert {id(p) for p in head["params"]} == {id(p) for p in module.net.head.parameters()}

    sgd = LitClassifier(
        ModelConfig(width=8, resolution=16).model_dump(),
        OptimConfig(batch_size=16, schedule="constant", optimizer="sgd", learning_rate=3e-3, reference_batch=64).model_dump(),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(sgd, train_dataloaders=DataLoader(TensorDataset(images, torch.randint(0, 10, (64,))), batch_size=16))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 * (16 * 2) / 64)  # SGD: linear


def test_early_stopping_ends_a_run_whose_validation_accuracy_stopped_improving(digits_splits: dict, tmp_path: Path):
    result = fit(FitConfig(
        beton_dir=digits_splits["dir"], run_dir=tmp_path / "run", wandb_save_dir=tmp_path, model=ModelConfig(width=8),
        # A rate too small to change a prediction: validation accuracy stays where it started.
        optim=OptimConfig(epochs=20, batch_size=100, learning_rate=1e-12, schedule="constant", early_stopping_patience=2),
    ))
    assert result.epochs_completed == 3  # the first epoch sets the best; two more without improvement stop it


def test_a_training_set_smaller_than_a_batch_trains_in_one_batch_and_a_too_small_one_says_so(digits_splits: dict, tmp_path: Path):
    """Training drops a ragged last batch: a batch larger than the data would train on nothing and leave no checkpoint."""
    from training.data import FFCVDataModule

    module = FFCVDataModule(digits_splits["dir"], batch_size=64, num_workers=1, seed=0, resolution=32, train_indices=np.arange(10, dtype=np.uint64))
    assert module._train_batch_size(digits_splits["dir"] / "train.beton") == 10
    assert module.train_dataloader().batch_size == 10 and len(module.train_dataloader()) == 1
    module.train_indices = None
    assert module._train_batch_size(digits_splits["dir"] / "train.beton") == 64  # 400 examples: the configured size
    module.train_indices = np.arange(1, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"train.beton: 1 training examples for 1 process\(es\); each needs at least 2"):
        module.train_dataloader()
