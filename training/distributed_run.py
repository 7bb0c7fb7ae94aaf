"""torchrun, tied to the process that started it, failing in one line.

Training runs as its own process tree (torchrun -> one worker per device). If the process that
launched it dies without cleaning up — a SIGKILLed `flywheel run` or Dagster step — the tree dies
with it instead of training on as an orphan beside the next attempt, which would resume the same
checkpoint folder.

When a worker fails, torchrun prints a table and a traceback of its own; the launcher's last line
(and, when `FAILURE_FILE_ENV` names a file, that file) says in one line which worker died and how:
the signal for a native crash or a kill, the exception for a Python error."""

import argparse
import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # the launcher itself validates no config: it starts without pydantic
    from pydantic import BaseModel

ConfigModel = TypeVar("ConfigModel", bound="BaseModel")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
FAILURE_FILE_ENV = "FLYWHEEL_TRAINING_FAILURE_FILE"
# Signals a process raises against itself when native code fails (as opposed to being killed).
NATIVE_CRASH_SIGNALS = {"SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"}


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent ends (elsewhere: nothing to do)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent was already gone before the request took effect
        sys.exit("training launcher: the process that started training has ended; not starting")


def entry_config(model: type[ConfigModel], description: str, argv: list[str] | None) -> ConfigModel:
    """The typed config whose JSON file is this entry point's one argument; the process is tied to
    its launcher first."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", type=Path, help=f"{model.__name__} as JSON")
    args = parser.parse_args(argv)
    die_with_parent()
    return model.model_validate_json(args.config.read_text())


def describe_failure(error) -> str:
    """One line for torchrun's ChildFailedError: the first worker that failed, and how."""
    rank, failure = error.get_first_failure()
    worker = f"training worker rank {rank} (pid {failure.pid})"
    if failure.exitcode < 0:
        name = failure.signal_name()
        crash = ": a native crash inside the training process" if name in NATIVE_CRASH_SIGNALS else ""
        return f"{worker} was killed by signal {name} ({-failure.exitcode}){crash}"
    # A worker whose main has @record leaves "ExceptionType: message" in its error file; without one,
    # torchrun's placeholder text points at a web page, so point at the log instead.
    detail = failure.message["message"] if isinstance(failure.message, dict) else "see the training log above"
    first_line = (str(detail).strip().splitlines() or ["no message"])[0]
    return f"{worker} exited with code {failure.exitcode}: {first_line}"


def launch(argv: list[str]) -> None:
    """torchrun with `argv`; a failed worker ends this process with the one-line description."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as error:
        message = describe_failure(error)
        if failure_file := os.environ.get(FAILURE_FILE_ENV):
            Path(failure_file).write_text(message + "\n")
        sys.exit(message)


if __name__ == "__main__":
    die_with_parent()
    launch(sys.argv[1:])
