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
from typing import TYPE_CHECKING

from pydantic import ValidationError
from safetensors import safe_open

from training.card import ModelCard

if TYPE_CHECKING:
    import onnxruntime as ort

VERSION_PATTERN = re.compile(r"v(\d{4,})")
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
CHAMPION_FILE = "champion"
HISTORY_FILE = "champion_history.jsonl"


class RegistryError(Exception):
    """A registry that does not hold what it should; the message says what and where."""


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

    def card(self) -> ModelCard:
        card_path = self.path / CARD_FILE
        try:
            return ModelCard.model_validate_json(card_path.read_bytes())
        except OSError as error:
            raise RegistryError(f"model card {card_path} is unreadable: {error}") from None
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the file"
            raise RegistryError(
                f"model card {card_path} is not a valid card: {where}: {first['msg']} ({error.error_count()} problem(s))"
            ) from None

    def inference_session(self, file: str = INT8_FILE) -> ort.InferenceSession:
        """An ONNX Runtime session on one of the version's models, checked against the ONNX contract."""
        # Imported here: reading the registry (cards, the champion pointer) needs no ONNX Runtime.
        from training.inference import onnx_session

        path = self.path / file
        try:
            session = onnx_session(path)
        except Exception as error:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RegistryError(f"{self.version}: {path} is not a loadable ONNX model ({reason})") from None
        inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if inputs != ["image"] or outputs != ["logits"]:
            raise RegistryError(f"{self.version}: {path} takes {inputs} and returns {outputs}, not image -> logits")
        return session

    def verify(self) -> None:
        """Raise RegistryError naming the first file of the version that cannot be used as served."""
        self.card()
        for file in (FP32_FILE, INT8_FILE):
            self.inference_session(file)
        try:
            with safe_open(str(self.weights), framework="pt") as weights:
                weights.keys()
        except Exception as error:  # safetensors raises SafetensorError, OSError...
            raise RegistryError(f"{self.version}: {self.weights} is not readable safetensors ({error})") from None


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

    def publish(self, staging_dir: Path, card: ModelCard) -> ModelVersion:
        """Move a complete staging folder into the registry as the next version, with its card."""
        self.root.mkdir(parents=True, exist_ok=True)
        for required in (FP32_FILE, INT8_FILE, WEIGHTS_FILE):
            if not (staging_dir / required).is_file():
                raise RegistryError(f"cannot publish {staging_dir}: {required} is missing")
        while True:
            number = max((int(v.version[1:]) for v in self.versions()), default=0) + 1
            version = f"v{number:04d}"
            (staging_dir / CARD_FILE).write_text(card.model_copy(update={"version": version}).model_dump_json(indent=2))
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

    def champion_pointer(self) -> str | None:
        """The version name the champion pointer holds, unchecked."""
        pointer = self.root / CHAMPION_FILE
        return pointer.read_text().strip() if pointer.exists() else None

    def champion(self) -> ModelVersion | None:
        pointer = self.root / CHAMPION_FILE
        version = self.champion_pointer()
        if version is None:
            return None
        try:
            return self.get(version)
        except RegistryError as error:
            raise RegistryError(f"the champion pointer {pointer} names {version!r}, which is unusable: {error}") from None

    def find(self, fingerprint: str) -> ModelVersion | None:
        """The version published from inputs with this fingerprint (card `lineage.inputs_fingerprint`)."""
        for version in self.versions():
            if version.card().lineage.inputs_fingerprint == fingerprint:
                return version
        return None

    def promote(self, version: str, reason: str) -> ModelVersion:
        """Make `version` the champion: check that ONNX Runtime serves it, write the pointer beside
        the old one, fsync, then rename over it. Promoting the champion again changes nothing."""
        model = self.get(version)
        model.verify()
        previous = self.champion_pointer()
        if previous == version:
            return model
        pointer = self.root / CHAMPION_FILE
        partial = self.root / f".{CHAMPION_FILE}.partial"
        with open(partial, "w") as handle:
            handle.write(version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, pointer)
        _fsync(self.root)
        with open(self.root / HISTORY_FILE, "a") as history:
            history.write(json.dumps({"champion": version, "previous": previous, "reason": reason}) + "\n")
        return model

    def rollback(self, to: str | None = None) -> ModelVersion:
        """Make `to`, or else the champion the current one replaced, the champion again."""
        current = self.champion_pointer()
        if to is None:
            if current is None:
                raise RegistryError("there is no champion to roll back from")
            replaced = [h["previous"] for h in self.history() if h["champion"] == current and h["previous"]]
            if not replaced:
                raise RegistryError(f"{current} replaced no earlier champion: there is nothing to roll back to")
            to = replaced[-1]
        return self.promote(to, reason=f"rollback from {current or 'none'}")

    def history(self) -> list[dict]:
        path = self.root / HISTORY_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def staging_dir(self, name: str) -> Path:
        """A fresh hidden folder inside the registry (same filesystem, so publish can rename it)."""
        self.discard_staging(name)
        path = self.root / f".staging-{name}"
        path.mkdir(parents=True)
        return path

    def discard_staging(self, name: str) -> None:
        """Remove what an export that never published left behind (it is never read as a version)."""
        shutil.rmtree(self.root / f".staging-{name}", ignore_errors=True)


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
