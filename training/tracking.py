"""Reading W&B runs back without the network: offline runs keep every record in `run-<id>.wandb`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal.datastore import DataStore


@dataclass
class OfflineRun:
    run_id: str
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
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "config":
            run.config.update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in _items(record.config.update).items()})
    return run
