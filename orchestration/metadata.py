"""Helpers that turn results into Dagster metadata people read in the UI."""

from __future__ import annotations

import base64
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
