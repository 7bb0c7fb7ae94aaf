"""One training as the `trained_model` asset launches it (`python -m training.fit` in its own process:
imports, FFCV's compilation and all), for the benchmarks that compare trainings."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from training.config import RECIPES, FitConfig, ModelConfig, OptimConfig


def train(
    name: str, beton_dir: Path, root: Path, model: ModelConfig, optim: OptimConfig, warm_start: Path | None = None,
    rows: np.ndarray | None = None,
) -> dict:
    """Train on `beton_dir`'s train split (only `rows` of it, when given) with the small-images recipe;
    the training's wall time (`seconds`) and its `result.json`."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    indices = None
    if rows is not None:
        indices = run_dir / "train_rows.npy"
        np.save(indices, rows)
    config = FitConfig(
        beton_dir=beton_dir, run_dir=run_dir, wandb_save_dir=root, run_name=f"bench-{name}",
        model=model, optim=optim, augment=RECIPES["small_images"], warm_start=warm_start, train_indices=indices,
    )
    (run_dir / "fit_config.json").write_text(config.model_dump_json())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "training.fit", str(run_dir / "fit_config.json")], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{Path(sys.argv[0]).name}: training {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), **json.loads((run_dir / "result.json").read_text())}
