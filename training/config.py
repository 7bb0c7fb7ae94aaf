"""Typed configuration of a training run: what the `fit` entry point receives as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ComputeConfig(BaseModel):
    """Where and how training runs. GPU settings are configuration; the code never assumes one."""

    model_config = ConfigDict(extra="forbid")

    accelerator: str = Field("auto", description="Lightning accelerator: auto picks cuda when present, else cpu.")
    devices: int | str = Field("auto", description="Devices per node; processes per node follow it under torchrun.")
    num_nodes: int = Field(1, ge=1, description="Machines taking part (torchrun --nnodes).")
    strategy: str = Field("auto", description="Lightning strategy; ddp whenever more than one process runs.")
    precision: str | None = Field(
        None,
        description="None picks per accelerator: 32-true on CPU (bf16 autocast is slower there), "
        "bf16-mixed on GPUs that support it, else 16-mixed.",
    )
    compile: bool = Field(False, description="torch.compile the network (pays off on GPUs, long runs).")
    num_workers: int = Field(2, ge=1, description="FFCV loader threads per process.")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: Literal["resnet_small"] = Field("resnet_small", description="The network: a small ResNet for small images.")
    width: int = Field(32, ge=4, description="Channels of the first ResNet stage; later stages double it.")
    blocks_per_stage: int = Field(1, ge=1, description="Residual blocks in each of the three stages (1: ResNet-8).")
    num_classes: int = Field(10, ge=2, description="Labels are 0 .. num_classes - 1 (10 for the digits default).")
    resolution: int = Field(32, ge=8, le=1024, description="Square training and serving resolution in pixels (H = W).")


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(8, ge=1, description="Enough for >= 0.95 test accuracy on the digits default.")
    batch_size: int = Field(64, ge=1, description="Per process; the global batch is this times the world size.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with Nesterov momentum 0.9.")
    schedule: Literal["onecycle", "cosine", "constant"] = Field("onecycle", description="Learning-rate schedule, stepped per batch.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(5e-4, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD).")
    seed: int = Field(0, description="Same data, config and seed -> same training attempt (resumable).")


# What `training.fit` writes into `FitConfig.run_dir` when rank 0 finishes; the orchestrator reads it.
RESULT_FILE = "result.json"


class FitConfig(BaseModel):
    """Everything `training.fit` needs; written to JSON by the orchestrator, read by every rank."""

    model_config = ConfigDict(extra="forbid")

    beton_dir: Path = Field(description="Folder with train.beton and val.beton.")
    run_dir: Path = Field(description="This training attempt's folder: checkpoints, result.json.")
    wandb_save_dir: Path = Field(description="W&B writes its runs to <this>/wandb (the data root).")
    wandb_project: str = "flywheel"
    run_name: str = "train"
    tags: dict[str, str] = Field(default_factory=dict, description="Short labels for the W&B run (64 characters each).")
    reason: str = Field("manual", description="Why this training runs (the retraining policy's reasons); the W&B run's notes.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    warm_start: Path | None = Field(None, description="safetensors weights to start from (the champion's).")
    fast_dev_run: bool = False
    audit_examples: bool = Field(
        False, description="Each rank writes a digest of every image of its first epoch to run_dir/audit/ (data-sharding checks)."
    )
