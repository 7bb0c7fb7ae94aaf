"""Resources: the data root every stage shares, and the compute that training runs on."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from orchestration.project import Project, load_project
from transforms.images import Preprocessing
from training.config import ComputeConfig, KubernetesConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def environment_executable(name: str) -> str:
    """A program of this Python environment (venv), found through sys.prefix: the code server that
    `dagster dev` starts may run with a sys.executable outside the venv's bin folder."""
    candidate = Path(sys.prefix) / "bin" / name
    return str(candidate) if candidate.exists() else name


def default_home() -> str:
    """`$FLYWHEEL_HOME`, or `.flywheel` in the repository (DESIGN.md's data contract)."""
    return str(Path(os.environ.get("FLYWHEEL_HOME") or REPO_ROOT / ".flywheel").resolve())


class FlywheelHome(dg.ConfigurableResource):
    """The data root and the facts about the data every stage must agree on."""

    home: str = Field("", description="Data root; empty means $FLYWHEEL_HOME, else .flywheel in the repository.")
    settings_file: str = Field(
        "", description="The project file: the project's classes and resolution, and per-asset run settings that the "
        "sensors and the schedule put on the runs they request; empty means $FLYWHEEL_HOME/flywheel.yaml when it exists.",
    )

    @property
    def root(self) -> Path:
        return Path(self.home).resolve() if self.home else Path(default_home())

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def labels(self) -> Path:
        return self.landing / "labels"

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def dbt_target(self) -> Path:
        """dbt's artifacts and logs for this data root: one folder, reused by every build, so its partial
        parse (made for this root's warehouse path) is reused too and nothing accumulates."""
        return self.root / "dbt"

    @property
    def ffcv(self) -> Path:
        return self.root / "ffcv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def pretrained(self) -> Path:
        """The user's pretrained checkpoints (`trained_model`'s `pretrained` is relative to it)."""
        return self.root / "pretrained"

    @property
    def tuning(self) -> Path:
        """Optuna studies (journal files) and their trials' folders."""
        return self.root / "tuning"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def int8_recipes(self) -> Path:
        """The int8 recipe chosen per architecture and machine (`training.export.RecipeMemory`)."""
        return self.root / "export" / "int8_recipes.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def labeling(self) -> Path:
        """The labeling queues, one folder per batch (`labeling_queue`): Label Studio's local-files root."""
        return self.root / "labeling"

    @property
    def settings(self) -> Path:
        return Path(self.settings_file) if self.settings_file else self.root / "flywheel.yaml"

    @property
    def project(self) -> Project:
        """The project settings, read at each use: the daemon follows edits without a restart."""
        return load_project(self.settings)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.project.preprocessing

    def landing_file(self, batch_id: str) -> Path:
        from transforms.landing import check_batch_id

        return self.landing / f"{check_batch_id(batch_id)}.parquet"


KUBERNETES_FIELDS = KubernetesConfig.model_fields


class KubernetesPods(dg.Config):
    """`training.config.KubernetesConfig` as Dagster configuration (its defaults and descriptions)."""

    image: str = KUBERNETES_FIELDS["image"]
    namespace: str = KUBERNETES_FIELDS["namespace"]
    volume_claim: str = KUBERNETES_FIELDS["volume_claim"]
    cpus_per_node: str = KUBERNETES_FIELDS["cpus_per_node"]
    memory_per_node: str = KUBERNETES_FIELDS["memory_per_node"]
    gpus_per_node: int = KUBERNETES_FIELDS["gpus_per_node"]
    service_account: str = KUBERNETES_FIELDS["service_account"]
    env_secret: str = KUBERNETES_FIELDS["env_secret"]


class TrainingCompute(dg.ConfigurableResource):
    """Where training runs, and with launcher ray where ingestion decodes and measures images too. The
    assets are the same on a laptop, a multi-GPU box or a cluster; only this changes (see the README's
    scale-out guide)."""

    accelerator: str = ComputeConfig.model_fields["accelerator"]
    devices: str = Field("auto", pattern=r"^(auto|[1-9][0-9]*)$", description="Processes per node: a number, or auto (all GPUs, else 1).")
    num_nodes: int = ComputeConfig.model_fields["num_nodes"]
    node_rank: int = Field(0, ge=0, description="This node's rank when num_nodes > 1.")
    rdzv_endpoint: str = Field("", description="host:port of the rendezvous for multi-node training.")
    strategy: str = ComputeConfig.model_fields["strategy"]
    precision: str = Field("", description="Empty picks per accelerator (32-true on CPU, bf16-mixed on GPUs).")
    compile: bool | None = ComputeConfig.model_fields["compile"]
    sync_batchnorm: bool = ComputeConfig.model_fields["sync_batchnorm"]
    num_workers: int | None = ComputeConfig.model_fields["num_workers"]
    launcher: Literal["torchrun", "ray", "kubernetes"] = ComputeConfig.model_fields["launcher"]
    ray_address: str = ComputeConfig.model_fields["ray_address"]
    workers: int = ComputeConfig.model_fields["workers"]
    cpus_per_worker: float = ComputeConfig.model_fields["cpus_per_worker"]
    gpus_per_worker: float = ComputeConfig.model_fields["gpus_per_worker"]
    max_failures: int = ComputeConfig.model_fields["max_failures"]
    kubernetes: KubernetesPods = Field(default_factory=KubernetesPods, description=ComputeConfig.model_fields["kubernetes"].description)
    gpus: int | None = Field(
        None, ge=1, description="GPUs of the cluster that trainings share (launcher ray or kubernetes): the gpu pool then runs "
        "gpus // (the GPUs one training asks for) trainings at once. Unset, or on one machine (torchrun, where every "
        "training would use the same devices): one at a time.",
    )

    def processes_per_node(self) -> int:
        if self.launcher == "ray":  # the cluster's workers, not this machine's devices
            return 1
        if self.launcher == "kubernetes":  # the pods' processes: this machine's devices say nothing about them
            return (self.kubernetes.gpus_per_node or 1) if self.devices == "auto" else int(self.devices)
        if self.devices != "auto":
            return int(self.devices)
        import torch  # here, not at the top: loading the definitions and the CLI needs no torch

        if self.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1

    def compute_config(self) -> dict:
        """ComputeConfig's fields as JSON: the training's placement, part of its attempt's identity."""
        processes = self.processes_per_node()
        ranks = self.workers if self.launcher == "ray" else processes * self.num_nodes
        config = {
            "accelerator": self.accelerator,
            "devices": processes,
            "num_nodes": 1 if self.launcher == "ray" else self.num_nodes,
            "strategy": "ddp" if ranks > 1 and self.strategy == "auto" else self.strategy,
            "precision": self.precision or None,
            "compile": self.compile,
            "sync_batchnorm": self.sync_batchnorm,
            "num_workers": self.num_workers,
            "launcher": self.launcher,
        }
        if self.launcher == "ray":
            config |= self.model_dump(include={"ray_address", "workers", "cpus_per_worker", "gpus_per_worker", "max_failures"})
        if self.launcher == "kubernetes":
            config["kubernetes"] = self.kubernetes.model_dump()
        return config

    def gpus_per_training(self) -> float:
        """The GPUs one training asks the cluster for."""
        if self.launcher == "ray":
            return self.workers * self.gpus_per_worker
        if self.launcher == "kubernetes":
            return self.num_nodes * self.kubernetes.gpus_per_node
        return 0.0

    def training_slots(self) -> int:
        """Slots of the `gpu` pool: trainings that may run at once."""
        need = self.gpus_per_training()
        return max(1, int(self.gpus // need)) if self.gpus and need else 1

    def launch_command(self, config_path: Path) -> list[str]:
        """The command that runs the training `config_path` describes: torchrun here, or a Ray Train job's driver."""
        if self.launcher == "ray":
            return [environment_executable("python"), "-m", "training.ray_train", str(config_path)]
        return self.torchrun_command(config_path)

    def torchrun_command(self, config_path: Path) -> list[str]:
        # torch.distributed.run (torchrun), launched so that it dies with the step that started it.
        command = [environment_executable("python"), "-m", "training.distributed_run", f"--nproc-per-node={self.processes_per_node()}"]
        if self.num_nodes > 1:
            command += [
                f"--nnodes={self.num_nodes}",
                f"--node-rank={self.node_rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
            ]
        else:
            command += ["--standalone"]
        return command + ["-m", "training.fit", str(config_path)]
