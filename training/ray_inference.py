"""The champion's pass over a batch for drift monitoring, on a Ray cluster: penultimate-layer
embeddings of the fp32 network and logits of the served int8 model, computed by Ray Data tasks of
`rows_per_task` images each with the functions the single-machine path runs
(`training.inference.embed_and_predict`, `predict_onnx`). The images are the image store's decoded
cache, read by each task from storage every node mounts; only embeddings and logits come back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.config import ModelConfig

ROWS_PER_TASK = 4096


def infer_rows(task: dict, images, weights: str, model: str, int8_model: str) -> dict:
    """A Ray Data task: one slice of the images through both models."""
    from training.inference import embed_and_predict, load_classifier, onnx_session, predict_onnx

    pixels = images[task["start"] : task["stop"]]
    embeddings, _ = embed_and_predict(load_classifier(Path(weights), ModelConfig.model_validate_json(model)), pixels)
    return {"start": task["start"], "embeddings": embeddings, "logits": predict_onnx(onnx_session(Path(int8_model)), pixels)}


def embed_and_score_on_ray(
    address: str, images, weights: Path, model: ModelConfig, int8_model: Path, rows_per_task: int = ROWS_PER_TASK,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, int8 logits) of `images` (a sliceable `[N, R, R, 3]` uint8 store, e.g. `PackPixels`), in their order."""
    import ray

    from training.ray_data import connected

    tasks = [{"start": start, "stop": min(start + rows_per_task, len(images))} for start in range(0, len(images), rows_per_task)]
    with connected(address):
        dataset = ray.data.from_items(tasks).map(
            infer_rows, num_cpus=1,
            fn_kwargs={"images": images, "weights": str(weights), "model": model.model_dump_json(), "int8_model": str(int8_model)},
        )
        parts = sorted(dataset.iter_rows(), key=lambda part: part["start"])
    return np.concatenate([part["embeddings"] for part in parts]), np.concatenate([part["logits"] for part in parts])
