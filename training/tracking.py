"""W&B outside training: the run mode, model artifacts, and reading offline runs back without the
network (an offline run keeps every record in `run-<id>.wandb`)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal.datastore import DataStore

from training.card import ModelCard


def wandb_mode() -> str:
    """Offline unless the user gave an API key; an explicit WANDB_MODE always wins."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


MODEL_ARTIFACT = "flywheel-classifier"
# The W&B model registry collection promoted versions are linked to (online runs; W&B cannot link offline).
REGISTRY_TARGET = "wandb-registry-model/flywheel-classifier"


def log_model_artifact(
    version_dir: Path, version: str, card: ModelCard, save_dir: Path, aliases: tuple[str, ...] = ("challenger",),
    job_type: str = "export", project: str = "flywheel",
) -> str:
    """Log a registry version's files as the W&B model artifact, aliased with the version and `aliases`,
    offline-safe; returns the id of the W&B run that logged it. An alias names one version of the
    artifact: logging the same files again (same digest, no new version) with `champion` moves that
    alias to them, which is how promotion and rollback keep W&B in step with `registry/champion`.
    Online, the champion is also linked into the W&B model registry with its alias."""
    import wandb

    run = wandb.init(
        project=project, dir=str(save_dir), mode=wandb_mode(), job_type=job_type, name=f"{job_type}-{version}",
        config={"version": version, "training_run": card.lineage.wandb_run_id, "aliases": list(aliases)},
    )
    try:
        artifact = wandb.Artifact(MODEL_ARTIFACT, type="model", metadata={"version": version, "metrics": card.metrics.model_dump()})
        for file in sorted(version_dir.iterdir()):
            artifact.add_file(str(file), name=file.name)
        run.log_artifact(artifact, aliases=[version, *aliases])
        if "champion" in aliases and not run.offline:
            artifact.wait()
            run.link_artifact(artifact, REGISTRY_TARGET, aliases=["champion"])
        return run.id
    finally:
        run.finish()


def log_champion(version_dir: Path, version: str, card: ModelCard, save_dir: Path, event: str) -> str:
    """The W&B side of a promotion or a rollback (`event`): the `champion` alias moves to `version`."""
    return log_model_artifact(version_dir, version, card, save_dir, aliases=("champion",), job_type=event)


def log_monitoring(report: dict, save_dir: Path, images: dict[str, Path] | None = None, project: str = "flywheel") -> str:
    """One W&B run per drift report (job type `monitor`): the drift figures of the batch as its summary,
    and `images` (key -> PNG: the sample grid, the drift-over-time plot)."""
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
            **({f"champion/estimated_accuracy{suffix}": report["estimated_accuracy"][key] for key, suffix in
                (("accuracy", ""), ("low", "_low"), ("high", "_high"))} if report.get("estimated_accuracy") else {}),
            **({"champion/estimate_error": report["estimate_check"]["error"]} if report.get("estimate_check") else {}),
            **{f"features/{f['feature']}": f["statistic"] for f in report["features"]},
            **{key: wandb.Image(str(path), caption=f"batch {report['batch_id']}") for key, path in (images or {}).items()},
        })
        return run.id
    finally:
        run.finish()


def log_evaluation(
    name: str, metrics: dict, class_names: list[str], worst: list[dict], save_dir: Path, project: str = "flywheel",
) -> str:
    """One W&B run per evaluation (job type `evaluate`): per-class metrics, the confusion matrix and
    the worst misclassified test images as W&B tables. `metrics` is `Metrics.to_dict()`; `worst`
    rows have `image` (uint8 HWC), `label`, `predicted`, `confidence`, `batch`."""
    import wandb

    run = wandb.init(project=project, dir=str(save_dir), mode=wandb_mode(), job_type="evaluate", name=name)
    try:
        per_class = wandb.Table(
            columns=["class", "name", "precision", "recall", "support"],
            data=[[row["class"], class_names[row["class"]], row["precision"], row["recall"], row["support"]] for row in metrics["per_class"]],
        )
        confusion = wandb.Table(
            columns=["actual", "predicted", "count"],
            data=[[class_names[a], class_names[p], count] for a, row in enumerate(metrics["confusion"]) for p, count in enumerate(row) if count],
        )
        misclassified = wandb.Table(
            columns=["image", "label", "predicted", "confidence", "batch"],
            data=[[wandb.Image(row["image"]), class_names[row["label"]], class_names[row["predicted"]], row["confidence"], row["batch"]] for row in worst],
        )
        run.log({"evaluation/per_class": per_class, "evaluation/confusion_matrix": confusion, "evaluation/worst_misclassified": misclassified})
        run.summary.update({"test/accuracy": metrics["accuracy"], "test/macro_f1": metrics["macro_f1"], "test/ece": metrics["ece"]})
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
    artifacts: list[dict] = field(default_factory=list)  # name, type, digest, aliases, files of each artifact it logged


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def find_offline_run(wandb_dir: Path, run_id: str) -> Path:
    matches = sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    if not matches:
        raise FileNotFoundError(f"no offline W&B run {run_id} under {wandb_dir}")
    return matches[-1]


def read_offline_run(path: Path, wait_seconds: float = 30.0) -> OfflineRun:
    """Config, per-step history, final summary and artifacts of one offline run file. W&B's service
    may still be writing the file's last records when `run.finish()` returns: the file is read
    again until its exit record is there (at most `wait_seconds`)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        run, complete = _scan_offline_run(path)
        if complete or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _scan_offline_run(path: Path) -> tuple[OfflineRun, bool]:
    store = DataStore()
    store.open_for_scan(str(path))
    run, complete = OfflineRun(run_id=path.stem.removeprefix("run-")), False
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
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append({
                "name": artifact.name, "type": artifact.type, "digest": artifact.digest, "aliases": list(artifact.aliases),
                "files": [entry.path for entry in artifact.manifest.contents],
            })
        elif kind == "config":
            run.config.update({k: v.get("value", v) if isinstance(v, dict) else v for k, v in _items(record.config.update).items()})
        elif kind == "exit":
            complete = True
    return run, complete
