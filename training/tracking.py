"""W&B outside training: the run mode, model artifacts, and reading offline runs back without the
network (an offline run keeps every record in `run-<id>.wandb`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal.datastore import DataStore

from training.card import ModelCard


def wandb_mode() -> str:
    """Offline unless the user gave an API key; an explicit WANDB_MODE always wins."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def log_model_artifact(version_dir: Path, version: str, card: ModelCard, save_dir: Path, project: str = "flywheel") -> str:
    """Log a registry version's files as a W&B model artifact (aliases: the version), offline-safe.
    Returns the id of the W&B run that logged it."""
    import wandb

    run = wandb.init(
        project=project, dir=str(save_dir), mode=wandb_mode(), job_type="export", name=f"export-{version}",
        config={"version": version, "training_run": card.lineage.wandb_run_id},
    )
    try:
        artifact = wandb.Artifact("flywheel-classifier", type="model", metadata={"version": version, "metrics": card.metrics.model_dump()})
        for file in sorted(version_dir.iterdir()):
            artifact.add_file(str(file), name=file.name)
        run.log_artifact(artifact, aliases=[version])
        return run.id
    finally:
        run.finish()


def log_monitoring(report: dict, save_dir: Path, project: str = "flywheel") -> str:
    """One W&B run per drift report (job type `monitor`): the drift figures of the batch as its summary."""
    import wandb

    run = wandb.init(
        project=project, dir=str(save_dir), mode=wandb_mode(), job_type="monitor", name=f"drift-{report['batch_id']}",
        config={"batch_id": report["batch_id"], "champion": report["champion"]},
    )
    try:
        run.log({
            "drift/drifted": int(report["drifted"]),
            "drift/feature_share": report["drifted_share"],
            "drift/embedding_mmd2": report["embedding"]["mmd2"],
            "drift/embedding_p_value": report["embedding"]["p_value"],
            "drift/prediction_statistic": report["predictions"]["statistic"],
            **({"champion/accuracy_on_labels": report["champion_accuracy"]} if report["champion_accuracy"] is not None else {}),
            **{f"features/{f['feature']}": f["statistic"] for f in report["features"]},
        })
        return run.id
    finally:
        run.finish()


@dataclass
class OfflineRun:
    run_id: str
    group: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def find_offline_run(wandb_dir: Path, run_id: str) -> Path:
    matches = sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    if not matches:
        raise FileNotFoundError(f"no offline W&B run {run_id} under {wandb_dir}")
    return matches[-1]


def read_offline_run(path: Path) -> OfflineRun:
    """Config, per-step history and final summary of one offline run file."""
    store = DataStore()
    store.open_for_scan(str(path))
    run = OfflineRun(run_id=path.stem.removeprefix("run-"))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group = record.run.run_group
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "config":
            run.config.update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in _items(record.config.update).items()})
    return run
