"""Helpers that turn results into Dagster metadata people read in the UI."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl


def markdown_table(frame: pl.DataFrame) -> dg.MarkdownMetadataValue:
    if frame.is_empty():
        return dg.MetadataValue.md("_no rows_")
    with pl.Config(
        tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
        tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=40,
    ):
        return dg.MetadataValue.md(str(frame))


def markdown_image(path: Path, title: str) -> dg.MarkdownMetadataValue:
    """An image embedded in markdown, so the Dagster UI shows it inline in the materialization."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def inputs_fingerprint(inputs) -> str:
    """A short, stable id of JSON-able inputs: equal inputs, equal id (attempt folders, registry reuse)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit the code runs from (with `+dirty` for local changes), for model lineage."""
    import subprocess

    from orchestration.resources import REPO_ROOT

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def drift_over_time_png(reports: list[dict], path: Path) -> Path:
    """Per batch, in capture order: share of drifted image statistics, embedding-drift p-value and the
    champion's accuracy on the batch's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch_id"] for r in reports]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.5), dpi=100, sharex=True)
    top.bar(batches, [r["drifted_share"] for r in reports], color=["tab:red" if r["drifted"] else "tab:blue" for r in reports])
    top.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    top.set(ylabel="drifted share", ylim=(0, 1), title="drift over time (red: drifted)")
    bottom.plot(batches, [r["embedding"]["p_value"] for r in reports], marker="o", label="embedding MMD p-value")
    bottom.plot(batches, [r["champion_accuracy"] if r["champion_accuracy"] is not None else float("nan") for r in reports],
                marker="s", label="champion accuracy on labels")
    bottom.set(ylim=(0, 1.05))
    bottom.legend(fontsize=7, loc="lower left")
    bottom.tick_params(axis="x", labelrotation=45, labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
