"""The rows an incremental retraining trains on: the new batches whole, and a class-balanced
replay sample of the history, read from a split's index (two columns), never from its images."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl


@dataclass(frozen=True)
class ReplaySelection:
    """The rows of a split's file an incremental retraining trains on."""

    indices: np.ndarray  # sorted rows of the split's file; each new row `new_passes` times
    new_examples: int  # rows of the new batches: all of them
    new_passes: int  # times each new row is in `indices`: seen that often per epoch
    replay_examples: int  # rows sampled from the history
    history_examples: int  # rows the sample was drawn from
    replay_per_class: dict[int, int]


def replay_selection(
    index_path: Path, new_batches: list[str], replay_ratio: float, seed: int, new_passes: int = 1,
) -> ReplaySelection:
    """Every row of `new_batches` in the split described by `index_path` (`<split>.index.parquet`,
    row for row with its `.beton`), `new_passes` times each, and a class-balanced sample of the
    other rows, `replay_ratio` times as many as there are new rows (all of them when the history is
    smaller). Each class gets an equal share of the sample; a class with fewer rows than its share
    gives the rest to the others, so rare classes are replayed whole rather than drowned by common
    ones. Reads two columns of the index, not images."""
    index = pl.read_parquet(index_path, columns=["batch_id", "label"]).with_row_index("row")
    is_new = pl.col("batch_id").is_in(new_batches)
    new_rows = index.filter(is_new)["row"].to_numpy()
    history = index.filter(~is_new)
    wanted = min(round(replay_ratio * len(new_rows)), history.height)
    by_class = {label: rows["row"].to_numpy() for (label,), rows in history.group_by("label")}
    rng = np.random.default_rng(seed)
    taken, remaining = {}, wanted
    for position, (label, rows) in enumerate(sorted(by_class.items(), key=lambda item: (len(item[1]), item[0]))):
        share = min(len(rows), remaining // (len(by_class) - position))
        taken[int(label)] = rng.choice(rows, share, replace=False)
        remaining -= share
    replay = np.concatenate(list(taken.values())) if taken else new_rows[:0]
    return ReplaySelection(
        indices=np.sort(np.concatenate([*[new_rows] * new_passes, replay])).astype(np.uint64),
        new_examples=len(new_rows), new_passes=new_passes, replay_examples=len(replay), history_examples=history.height,
        replay_per_class={label: len(rows) for label, rows in sorted(taken.items())},
    )
