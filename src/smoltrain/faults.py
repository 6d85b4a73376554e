"""The one fault-injection hook the crash tests use: die, stop or fill the disk at an exact point of a run.

Production code names its points (`fault_point("in_save", step)`: after_step, in_save, in_log, in_upload,
after_upload) and knows nothing else. What fires there is one `Faults` object: a subprocess test installs
it through the environment, SMOLTRAIN_FAULT="after_step=12" or "in_save=20" (read once, here, on the
first point reached), and an in-process test with `install(Faults.parse(...))`. `NAME=STEP:ACTION` sends
another signal (stop, term, int) instead of SIGKILL, or raises a full disk's OSError (enospc);
comma-separated specs fire in order ("in_save=5:term,in_save=5:int" is a doubled signal inside a save).
Under torchrun, SMOLTRAIN_FAULT_RANK limits them to one rank.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

FAULT_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "int": signal.SIGINT}


@dataclass(frozen=True)
class Faults:
    """The faults to inject: (point, action) pairs such as ("in_save=20", "kill"), in firing order."""

    specs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> Faults:
        pairs = []
        for part in (spec or "").split(","):
            point, _, action = part.strip().partition(":")
            if point:
                pairs.append((point, action or "kill"))
        return cls(tuple(pairs))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        """SMOLTRAIN_FAULT, unless SMOLTRAIN_FAULT_RANK names another rank than this process's RANK."""
        rank = env.get("RANK", "0")
        if env.get("SMOLTRAIN_FAULT_RANK", rank) != rank:
            return cls()
        return cls.parse(env.get("SMOLTRAIN_FAULT"))

    def fire(self, name: str, step: int) -> None:
        for point, action in self.specs:
            if point != f"{name}={step}":
                continue
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), FAULT_ACTIONS[action])


_installed: Faults | None = None  # None until installed or first read from the environment


def install(faults: Faults | None) -> None:
    """Use `faults` from now on in this process (None: read the environment again at the next point)."""
    global _installed
    _installed = faults


def fault_point(name: str, step: int) -> None:
    """A named point of a run: fire whatever fault is installed for it (a no-op when none is)."""
    global _installed
    if _installed is None:
        _installed = Faults.from_env()
    _installed.fire(name, step)
