"""Helpers that turn results into Dagster metadata people read in the UI."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl


def markdown_table(frame: pl.DataFrame) -> dg.MarkdownMetadataValue:
    if frame.is_empty():
        return dg.MetadataValue.md("_no rows_")
    with pl.Config(
        tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
        tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=40, tbl_width_chars=65_535,  # never wrap cells: a markdown row is one line
    ):
        return dg.MetadataValue.md(str(frame))


def accuracy_text(accuracy: float, examples: int) -> str:
    """'97.96 % (95% CI 94.2-99.3 %, 147 images)': Wilson's interval, sound at 0 and 1."""
    from statsmodels.stats.proportion import proportion_confint  # seconds to import: only where it is used

    low, high = proportion_confint(round(accuracy * examples), examples, alpha=0.05, method="wilson")
    return f"{100 * accuracy:.2f} % (95% CI {100 * low:.1f}-{100 * high:.1f} %, {examples} images)"


def size_text(size: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def readable(metadata: dict) -> dict:
    """Metadata as people read it in the UI: `*_seconds` as '12.3 s', `*_bytes` in KiB/MiB, `*_share`
    as a percentage, NaN as 'n/a', other floats to 4 decimals (still numbers, so Dagster plots them
    across materializations). Other values pass as they are."""
    out = {}
    for key, value in metadata.items():
        number = value.value if isinstance(value, (dg.FloatMetadataValue, dg.IntMetadataValue)) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            out[key] = value
        elif isinstance(number, float) and math.isnan(number):
            out[key] = "n/a"
        elif key.endswith("_seconds"):
            out[key] = f"{number:.1f} s"
        elif key.endswith("_bytes"):
            out[key] = size_text(number)
        elif key.endswith("_share"):
            out[key] = f"{100 * number:.1f} %"
        elif isinstance(number, float):
            out[key] = round(number, 4)
        else:
            out[key] = value
    return out


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
    """Per batch, in capture order: share of drifted image statistics, embedding-drift p-value, the
    champion's accuracy on the batch's labels and its accuracy estimated before them, with its interval:
    where both show, the estimate's error over time."""
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
    # Reports from before accuracy estimates have none.
    estimates = [r.get("estimated_accuracy") or {"accuracy": float("nan"), "low": float("nan"), "high": float("nan")} for r in reports]
    middle, low, high = (np.array([e[key] for e in estimates]) for key in ("accuracy", "low", "high"))
    trusted = np.array([r.get("estimate_trusted", True) for r in reports])
    for shown, style in ((trusted, {"fmt": "^", "color": "tab:green", "label": "estimated accuracy before labels (95% interval)"}),
                         (~trusted, {"fmt": "^", "color": "grey", "mfc": "none", "label": "estimate on a drifted batch: not trusted"})):
        if shown.any():
            where = np.where(shown, 1.0, np.nan)
            bottom.errorbar(batches, middle * where, yerr=[(middle - low) * where, (high - middle) * where], capsize=3, **style)
    bottom.set(ylim=(0, 1.05))
    bottom.legend(fontsize=7, loc="lower left")
    bottom.tick_params(axis="x", labelrotation=45, labelsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _tiles(images: np.ndarray) -> np.ndarray:
    """Up to 16 images (uint8 NHWC) as one square grid."""
    images = images[:16]
    side = max(1, int(np.ceil(np.sqrt(len(images)))))
    height, width = images.shape[1:3]
    grid = np.full((side * (height + 2), side * (width + 2), 3), 255, np.uint8)
    for position, image in enumerate(images):
        row, column = divmod(position, side)
        grid[row * (height + 2):row * (height + 2) + height, column * (width + 2):column * (width + 2) + width] = image
    return grid


def sample_grid_png(batch: np.ndarray, reference: np.ndarray, path: Path, batch_id: str, reference_name: str) -> Path:
    """Up to 16 images of the batch beside up to 16 of the reference, as the model sees them
    (uint8 NHWC, served preprocessing): what drifted, to look at rather than read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(7, 3.8), dpi=100)
    for axis, images, title in ((axes[0], batch, f"batch {batch_id}"), (axes[1], reference, reference_name)):
        axis.imshow(_tiles(images), interpolation="nearest")
        axis.set_title(f"{title} ({min(len(images), 16)} images)", fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def image_grid_png(images: np.ndarray, captions: list[str], path: Path, title: str) -> Path:
    """Up to 16 images (uint8 NHWC) in a 4-column grid, each with its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(16, len(images))
    rows = max(1, int(np.ceil(count / 4)))
    figure, axes = plt.subplots(rows, 4, figsize=(7, 1.9 * rows + 0.4), dpi=100, squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position < count:
            axis.imshow(images[position], interpolation="nearest")
            axis.set_title(captions[position], fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
