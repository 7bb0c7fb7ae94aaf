"""The model registry under `$FLYWHEEL_HOME/registry` (DESIGN.md's model contract).

    registry/<version>/model.onnx, model.int8.onnx, weights.safetensors, card.json
    registry/champion      the current champion's version, replaced atomically

A version folder is assembled under a hidden temporary name and renamed into place complete, so a
reader never sees half a version; after that it is never changed. Nothing here is loaded with
pickle: weights are safetensors, models are ONNX, cards are JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

VERSION_PATTERN = re.compile(r"v(\d{4,})")
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
CHAMPION_FILE = "champion"
HISTORY_FILE = "champion_history.jsonl"


class RegistryError(Exception):
    """A registry that does not hold what it should; the message says what and where."""


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path

    @property
    def fp32(self) -> Path:
        return self.path / FP32_FILE

    @property
    def int8(self) -> Path:
        return self.path / INT8_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    def card(self) -> dict:
        card_path = self.path / CARD_FILE
        try:
            return json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RegistryError(f"model card {card_path} is unreadable: {error}") from None


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def versions(self) -> list[ModelVersion]:
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and VERSION_PATTERN.fullmatch(p.name)]
        return [ModelVersion(p.name, p) for p in sorted(found, key=lambda p: int(p.name[1:]))]

    def get(self, version: str) -> ModelVersion:
        if not VERSION_PATTERN.fullmatch(version):
            raise RegistryError(f"{version!r} is not a model version (expected v0001, v0002, ...)")
        path = self.root / version
        if not (path / CARD_FILE).is_file():
            raise RegistryError(f"model version {version} is not in the registry at {self.root}")
        return ModelVersion(version, path)

    def publish(self, staging_dir: Path, card: dict) -> ModelVersion:
        """Move a complete staging folder into the registry as the next version, with its card."""
        self.root.mkdir(parents=True, exist_ok=True)
        for required in (FP32_FILE, INT8_FILE, WEIGHTS_FILE):
            if not (staging_dir / required).is_file():
                raise RegistryError(f"cannot publish {staging_dir}: {required} is missing")
        while True:
            number = max((int(v.version[1:]) for v in self.versions()), default=0) + 1
            version = f"v{number:04d}"
            (staging_dir / CARD_FILE).write_text(json.dumps({**card, "version": version}, indent=2))
            _fsync_dir_files(staging_dir)
            try:
                # rename() of a directory onto a new name is atomic; it fails if the name was taken.
                os.rename(staging_dir, self.root / version)
            except OSError:
                if (self.root / version).exists():
                    continue
                raise
            _fsync(self.root)
            return ModelVersion(version, self.root / version)

    def champion(self) -> ModelVersion | None:
        pointer = self.root / CHAMPION_FILE
        if not pointer.exists():
            return None
        version = pointer.read_text().strip()
        try:
            return self.get(version)
        except RegistryError as error:
            raise RegistryError(f"the champion pointer {pointer} names {version!r}, which is unusable: {error}") from None

    def promote(self, version: str, reason: str) -> ModelVersion:
        """Make `version` the champion: write the pointer beside it, fsync, then rename over it."""
        model = self.get(version)
        previous = self.champion()
        pointer = self.root / CHAMPION_FILE
        partial = self.root / f".{CHAMPION_FILE}.partial"
        with open(partial, "w") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, pointer)
        _fsync(self.root)
        with open(self.root / HISTORY_FILE, "a") as history:
            history.write(json.dumps({"champion": version, "previous": previous.version if previous else None, "reason": reason}) + "\n")
        return model

    def rollback(self, to: str | None = None) -> ModelVersion:
        """Make `to`, or else the champion the current one replaced, the champion again."""
        current = self.champion()
        if to is None:
            if current is None:
                raise RegistryError("there is no champion to roll back from")
            replaced = [h["previous"] for h in self.history() if h["champion"] == current.version and h["previous"]]
            if not replaced:
                raise RegistryError(f"{current.version} replaced no earlier champion: there is nothing to roll back to")
            to = replaced[-1]
        return self.promote(to, reason=f"rollback from {current.version if current else 'none'}")

    def history(self) -> list[dict]:
        path = self.root / HISTORY_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def staging_dir(self, name: str) -> Path:
        """A fresh hidden folder inside the registry (same filesystem, so publish can rename it)."""
        path = self.root / f".staging-{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def _fsync(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync(directory)
