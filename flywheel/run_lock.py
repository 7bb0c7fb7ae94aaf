"""One `flywheel run` at a time per data root: a second one queues behind the first (or, with
--no-wait, refuses), so two ticks never ingest the same batch or start two trainings.

The lock is an advisory `flock` on a file under the data root: the kernel releases it when its
process ends, however it ends (SIGKILL included), so a crashed run never leaves a stale lock."""

import fcntl
import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

LOCK_FILE = ".flywheel-run.lock"


class RunInProgress(Exception):
    """Another `flywheel run` holds the data root and the caller asked not to wait."""


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started_at']}"
    except (OSError, ValueError, KeyError):
        return "a process that is just starting"


@contextmanager
def exclusive_run(root: Path, wait: bool = True, log: Callable[[str], None] = print) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"another flywheel run ({_holder(path)}) is working on {root}"
            if not wait:
                raise RunInProgress(f"{busy}; try again when it has finished") from None
            log(f"{busy}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": sys.argv[1:],
        }))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
