"""Loop benchmark: how much of a tick is learning? On the default digits, the wall time from landed
batches to a promoted champion, split by stage, against the training compute alone: the same
FitConfig (same data, epochs and network) run by `training.fit` in this process, one process, no
Dagster (target: tick <= 1.5x training). Two ticks, as `make run` does them:
  first   the first `flywheel run` of a fresh data root (it also searches the int8 recipe)
  loop    a drifted batch lands (`--drift invert`), the next `flywheel run` retrains and promotes

    .venv/bin/python bench/loop.py [--batches 4]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def step_seconds(dagster_home: Path, since: float) -> dict[str, float]:
    """Seconds per asset step over the runs started after `since` (partitions of one asset summed)."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    totals: dict[str, float] = defaultdict(float)
    with dg.DagsterInstance.get() as instance:
        for run in instance.get_runs():
            for step in instance.get_run_step_stats(run.run_id):
                if step.start_time and step.end_time and step.start_time >= since:
                    totals[step.step_key] += step.end_time - step.start_time
    return dict(totals)


def tick(home: Path, env: dict) -> dict:
    """One `flywheel run`; fails unless it promoted a new champion."""
    champion = home / "registry" / "champion"
    before = champion.read_text() if champion.exists() else None
    since, started = time.time(), time.perf_counter()
    run = subprocess.run([FLYWHEEL, "run"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode:
        raise SystemExit(f"flywheel run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    if not champion.exists() or champion.read_text() == before:
        raise SystemExit(f"the tick promoted no new champion:\n{run.stdout[-2000:]}")
    return {"seconds": seconds, "steps": step_seconds(home / "dagster", since)}


def training_alone(home: Path, scratch: Path) -> tuple[float, int]:
    """The latest attempt's FitConfig (its warm start included), trained in this process on one
    device: (seconds, epochs)."""
    from training.config import FitConfig
    from training.fit import fit

    config_path = max((home / "checkpoints").glob("*/fit_config.json"), key=lambda path: path.stat().st_mtime)
    config = FitConfig.model_validate_json(config_path.read_text())
    alone = config.model_copy(update={
        "run_dir": scratch, "wandb_save_dir": scratch,
        "compute": config.compute.model_copy(update={"devices": 1, "strategy": "auto"}),
    })
    started = time.perf_counter()
    fit(alone, log=lambda message: None)
    return time.perf_counter() - started, config.optim.epochs


def report(name: str, result: dict) -> None:
    seconds = result["seconds"]
    accounted = sum(result["steps"].values())
    print(f"\n{name} tick\n{'stage':<44}{'seconds':>9}{'share':>8}")
    for step, value in sorted(result["steps"].items(), key=lambda item: -item[1]):
        print(f"{step:<44}{value:>9.1f}{value / seconds:>8.0%}")
    print(f"{'outside steps (start-up, sensors, Dagster)':<44}{seconds - accounted:>9.1f}{(seconds - accounted) / seconds:>8.0%}")
    print(f"landed batch -> promoted champion: {seconds:.1f} s; training compute alone ({result['epochs']} epochs, "
          f"one process, in-process): {result['training_alone']:.1f} s; ratio {seconds / result['training_alone']:.2f}x (target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        env = {**os.environ, "FLYWHEEL_HOME": str(home), "WANDB_MODE": "offline"}
        env.pop("DAGSTER_HOME", None)
        simulate = [FLYWHEEL, "simulate"]
        subprocess.run(simulate + ["--batches", str(args.batches)], env=env, check=True, capture_output=True)
        results["first"] = tick(home, env)
        results["first"]["training_alone"], results["first"]["epochs"] = training_alone(home, Path(folder) / "alone-1")
        subprocess.run(
            simulate + ["--batches", "1", "--pool", "holdout", "--drift", "invert", "--prefix", "drift-invert"],
            env=env, check=True, capture_output=True,
        )
        results["loop"] = tick(home, env)
        results["loop"]["training_alone"], results["loop"]["epochs"] = training_alone(home, Path(folder) / "alone-2")
    for name, result in results.items():
        report(name, result)
    print(json.dumps({
        name: {
            "tick_seconds": round(r["seconds"], 2), "training_alone_seconds": round(r["training_alone"], 2),
            "ratio": round(r["seconds"] / r["training_alone"], 3), "epochs": r["epochs"],
            "steps_seconds": {step: round(value, 2) for step, value in r["steps"].items()},
        } for name, r in results.items()
    } | {"ratio_target_max": 1.5}))


if __name__ == "__main__":
    main()
