"""Loop benchmark: how much of a tick is learning? On the default digits, the wall time from a landed
batch to a promoted champion (`flywheel run`, the first tick of a fresh data root), split by stage,
against the training compute alone: the same FitConfig (same data, epochs and network) run by
`training.fit` in this process, one process, no Dagster (target: tick <= 1.5x training).

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


def step_seconds(dagster_home: Path) -> dict[str, float]:
    """Seconds per asset step over every run of the tick (partitions of one asset summed)."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    totals: dict[str, float] = defaultdict(float)
    with dg.DagsterInstance.get() as instance:
        for run in instance.get_runs():
            for step in instance.get_run_step_stats(run.run_id):
                if step.start_time and step.end_time:
                    totals[step.step_key] += step.end_time - step.start_time
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        env = {**os.environ, "FLYWHEEL_HOME": str(home), "WANDB_MODE": "offline"}
        env.pop("DAGSTER_HOME", None)
        subprocess.run([FLYWHEEL, "simulate", "--batches", str(args.batches)], env=env, check=True, capture_output=True)
        started = time.perf_counter()
        tick = subprocess.run([FLYWHEEL, "run"], env=env, capture_output=True, text=True)
        tick_seconds = time.perf_counter() - started
        if tick.returncode:
            raise SystemExit(f"flywheel run failed:\n{tick.stdout[-2000:]}\n{tick.stderr[-2000:]}")
        if not (home / "registry" / "champion").exists():
            raise SystemExit(f"the tick promoted no champion:\n{tick.stdout[-2000:]}")
        steps = step_seconds(home / "dagster")

        from training.config import FitConfig
        from training.fit import fit

        (config_path,) = sorted((home / "checkpoints").glob("*/fit_config.json"))[-1:]
        config = FitConfig.model_validate_json(config_path.read_text())
        alone = config.model_copy(update={
            "run_dir": Path(folder) / "alone", "wandb_save_dir": Path(folder) / "alone",
            "compute": config.compute.model_copy(update={"devices": 1, "strategy": "auto"}),
        })
        started = time.perf_counter()
        fit(alone, log=lambda message: None)
        training_seconds = time.perf_counter() - started

    accounted = sum(steps.values())
    print(f"\n{'stage':<28}{'seconds':>9}{'share':>8}")
    for step, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        print(f"{step:<28}{seconds:>9.1f}{seconds / tick_seconds:>8.0%}")
    print(f"{'outside steps (start-up, sensors, Dagster)':<28}{tick_seconds - accounted:>9.1f}{(tick_seconds - accounted) / tick_seconds:>8.0%}")
    print(f"\nlanded batches -> promoted champion: {tick_seconds:.1f} s; training compute alone "
          f"({config.optim.epochs} epochs, one process, in-process): {training_seconds:.1f} s; "
          f"ratio {tick_seconds / training_seconds:.2f}x (target <= 1.5x)")
    print(json.dumps({
        "tick_seconds": round(tick_seconds, 2), "training_alone_seconds": round(training_seconds, 2),
        "ratio": round(tick_seconds / training_seconds, 3), "ratio_target_max": 1.5,
        "epochs": config.optim.epochs, "steps_seconds": {step: round(value, 2) for step, value in steps.items()},
    }))


if __name__ == "__main__":
    main()
