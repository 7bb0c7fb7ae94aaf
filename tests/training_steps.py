"""Child process of `test_every_width_trains_on_cpu`: a few real Lightning training steps for each
configuration given as JSON on argv, printing `ok <width> <resolution>` after each one. A native
crash or a hang in one configuration kills only this process; the test names the configuration."""

import json
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.config import ModelConfig, OptimConfig
from training.model import LitClassifier


def train_a_few_steps(width: int, resolution: int, steps: int = 2, batch_size: int = 16) -> None:
    images = torch.randint(0, 256, (steps * batch_size, resolution, resolution, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (steps * batch_size,))
    model = LitClassifier(
        ModelConfig(width=width, resolution=resolution).model_dump(), OptimConfig(epochs=1, batch_size=batch_size).model_dump()
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=batch_size))
    assert trainer.global_step == steps


if __name__ == "__main__":
    for width, resolution in json.loads(sys.argv[1]):
        train_a_few_steps(width, resolution)
        print("ok", width, resolution, flush=True)
