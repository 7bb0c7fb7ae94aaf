"""Inference, in one place: torch networks from safetensors weights, ONNX Runtime sessions,
predictions, embeddings and latency. Evaluation, export, monitoring and `flywheel predict` use it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file

from training.config import ModelConfig
from training.backbones import Classifier, build_network


# Images per forward pass follow their size: activations grow with the pixels, and 256 photos at
# 224 px would hold gigabytes of them. 2^18 pixels: 256 images at 32 px, 5 at 224 px.
FORWARD_PIXELS = 2**18


def forward_batch(images: np.ndarray) -> int:
    """How many of these images (`[N, H, W, 3]`) one forward pass takes."""
    return max(1, FORWARD_PIXELS // (images.shape[1] * images.shape[2]))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_classifier(weights_path: Path, model_config: ModelConfig) -> Classifier:
    network = build_network(model_config)
    network.load_state_dict(load_weights(weights_path))
    return network.eval()


@torch.inference_mode()
def predict_torch(network: Classifier, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    batch_size = batch_size or forward_batch(images)
    outputs = [network(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(outputs).numpy()


@torch.inference_mode()
def embed_and_predict(
    network: Classifier, images: np.ndarray, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate-layer embeddings, predicted classes) of the images."""
    batch_size = batch_size or forward_batch(images)
    embeddings = [network.embed(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    embedded = torch.cat(embeddings) if embeddings else torch.zeros((0, network.head.in_features))
    return embedded.numpy(), network.head(embedded).argmax(dim=1).numpy()


def onnx_session(model_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def predict_onnx(session: ort.InferenceSession, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    batch_size = batch_size or forward_batch(images)
    outputs = [session.run(["logits"], {"image": images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs)


def onnx_latency_ms(session: ort.InferenceSession, images: np.ndarray, batch_size: int, runs: int = 20) -> float:
    """Median wall time of one `session.run` on a batch of `batch_size` images, after a warm-up run."""
    batch = np.resize(images, (batch_size, *images.shape[1:]))
    session.run(["logits"], {"image": batch})
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(["logits"], {"image": batch})
        timings.append(time.perf_counter() - started)
    return float(np.median(timings) * 1000)
