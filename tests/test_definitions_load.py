"""Every process that serves the Dagster definitions loads them (webserver, daemon, each launched run,
`flywheel run`), and every CLI command loads the CLI: neither may pull in the training stack, which
costs ~20 s per process (FFCV compiles with numba on import)."""

import json
import subprocess
import sys

HEAVY = ("torch", "lightning", "ffcv", "numba", "onnxruntime", "onnx", "wandb", "sklearn")


def modules_loaded_by(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_the_definitions_load_without_the_training_stack():
    assert modules_loaded_by("from orchestration.definitions import defs; defs.resolve_all_job_defs()") == []


def test_status_and_help_load_without_dagster_definitions_or_the_training_stack(tmp_path):
    code = (
        "from flywheel.cli import build_parser; build_parser().format_help()\n"
        f"from flywheel.summary import print_status; from orchestration.resources import FlywheelHome; print_status(FlywheelHome(home={str(tmp_path)!r}))"
    )
    assert modules_loaded_by(code) == []
