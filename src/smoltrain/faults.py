"""The fault-injection hook the crash tests use: die, stop or fill the disk at an exact point of a run."""

from __future__ import annotations

import errno
import os
import signal

FAULT_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "int": signal.SIGINT}


def fault_point(name: str, step: int) -> None:
    """Test hook: SMOLTRAIN_FAULT="after_step=12" or "in_save=20" SIGKILLs this process right there.

    Lets the crash tests kill a run at an exact point (after an optimizer step, or inside a checkpoint
    save) instead of racing a timer; a no-op when the variable is unset. `NAME=STEP:ACTION` sends
    another signal (stop, term, int) instead, or raises a full disk's OSError (enospc); comma-separated
    specs fire in order ("in_save=5:term,in_save=5:int" is a doubled signal inside a save). Under
    torchrun, SMOLTRAIN_FAULT_RANK limits it to one rank.
    """
    spec = os.environ.get("SMOLTRAIN_FAULT")
    rank = os.environ.get("RANK", "0")
    if not spec or os.environ.get("SMOLTRAIN_FAULT_RANK", rank) != rank:
        return
    for part in spec.split(","):
        point, _, action = part.strip().partition(":")
        if point != f"{name}={step}":
            continue
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), FAULT_ACTIONS[action or "kill"])
