"""The project's classes: named, each with a stable index (its position), stored in the warehouse.

Where they come from, first match wins:
1. `classes` in the project file `flywheel.yaml`: fixed by the user. Classes already stored must
   stay its first entries in the same order, so every index keeps its meaning; a new class is added
   by appending it.
2. The classes already stored in the warehouse.
3. Discovered from the first labeled landing: the class names it declares (`flywheel land` writes
   every name of the whole landing into each of its batch files), else its labels' names, sorted.
   Integer labels (the digits default) mean the classes "0" .. "9".

Labels in landing and label files may be class names or indices. Names are compared composed (NFC)
and stripped (`class_name`). A name outside the classes is quarantined as `unknown_class`, with a
message that says how to add it.
"""

from __future__ import annotations

import re
import unicodedata

import polars as pl

DIGITS_CLASSES = tuple(str(index) for index in range(10))
# Letters and digits of any script (`\w` is Unicode's in a str pattern): "café", "Straße", "猫" are
# class names; symbols, quotes and path separators are not.
CLASS_NAME_PATTERN = re.compile(r"[^\W_][\w .+-]{0,63}")
CLASS_NAME_RULE = "1-64 letters, digits, spaces and _ . + -, starting with a letter or digit"
INDEX_PATTERN = r"^\d{1,9}$"


class ClassesError(Exception):
    """Classes that contradict the stored ones; the message says what to change."""


def class_name_problem(name: str) -> str | None:
    return None if CLASS_NAME_PATTERN.fullmatch(name) else f"class name {name!r} is not allowed ({CLASS_NAME_RULE})"


def class_name(text: str) -> str:
    """A class or label name as flywheel compares it: composed (NFC), without surrounding spaces. macOS
    writes folder names decomposed ("e" and a combining accent), editors may too: "café" is one class
    whether it comes from a folder, a manifest, a label file or flywheel.yaml."""
    return unicodedata.normalize("NFC", text).strip()


def label_text(labels: pl.Expr | pl.Series) -> pl.Expr | pl.Series:
    """`class_name` of a column of labels (names or indices, text or integers)."""
    return labels.cast(pl.Utf8).str.normalize("NFC").str.strip_chars()


def resolve_classes(
    stored: list[str], configured: list[str], landed_labels: pl.Series, declared: list[str] | None = None
) -> list[str]:
    """The classes after a landing with these labels (see the module doc); [] while nothing decides them."""
    if configured:
        if configured[: len(stored)] != stored:
            raise ClassesError(
                f"flywheel.yaml lists classes {configured}, but the warehouse already holds {stored} with those "
                "indices: keep them first, in that order, and append new classes after them"
            )
        return list(configured)
    if stored:
        return list(stored)
    labels = landed_labels.drop_nulls()
    if labels.is_empty():
        return []
    if labels.dtype.is_integer() or labels.cast(pl.Utf8).str.contains(INDEX_PATTERN).all():
        return list(DIGITS_CLASSES)
    names = [class_name(name) for name in declared] if declared else label_text(labels).unique().to_list()
    return sorted(name for name in set(names) if class_name_problem(name) is None and not re.fullmatch(INDEX_PATTERN, name))


def label_index(labels: pl.Expr, classes: list[str]) -> pl.Expr:
    """A label column of names or indices (as text or integers) -> the class index; null where the label
    is null or names no class."""
    names = pl.Series("name", classes, dtype=pl.Utf8)
    text = label_text(labels)
    by_name = text.replace_strict(names, pl.Series(range(len(classes)), dtype=pl.Int64), default=None, return_dtype=pl.Int64)
    by_index = pl.when(text.str.contains(INDEX_PATTERN)).then(text.cast(pl.Int64, strict=False))
    in_range = by_index.is_between(0, len(classes) - 1)
    return pl.coalesce(by_name, pl.when(in_range).then(by_index))


def unknown_label_message(label: str, classes: list[str]) -> str:
    if not classes:
        return (f"label {label!r} names no class: the project has none yet; land a labeled batch first, or list "
                "`classes` in flywheel.yaml")
    shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
    if re.fullmatch(INDEX_PATTERN, label.strip()):
        return f"label {label} is outside the class indices 0..{len(classes) - 1} ({shown})"
    return (
        f"label {label!r} is not one of the project's classes ({shown}); to add it, append it to `classes` in "
        "flywheel.yaml and ingest the batch again"
    )
