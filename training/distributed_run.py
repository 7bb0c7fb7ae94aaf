"""torchrun, tied to the process that started it.

Training runs as its own process tree (torchrun -> one worker per device). If the process that
launched it dies without cleaning up — a SIGKILLed `flywheel run` or Dagster step — the tree dies
with it instead of training on as an orphan beside the next attempt, which would resume the same
checkpoint folder."""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent ends (elsewhere: nothing to do)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent was already gone before the request took effect
        sys.exit("training launcher: the process that started training has ended; not starting")


if __name__ == "__main__":
    die_with_parent()
    from torch.distributed.run import main

    main()
