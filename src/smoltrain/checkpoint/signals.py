"""SIGTERM/SIGINT as a request to stop: remembered, acted on by the loop at a step boundary.

The handler only records the signal; the loop saves the current step (unless it was just saved) and
exits. A signal that lands inside a save is therefore acted on after the commit, and a second one
never abandons a save in progress: it says so and waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _say(msg: str) -> None:
    """Write from a signal handler: os.write does not re-enter the buffered sys.stderr."""
    try:
        os.write(2, msg.encode())
    except OSError:
        pass


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.saving_step: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Back to the previous handlers, unless a stop is under way: the process is exiting, and a
        late second signal must not kill it in the middle of its teardown."""
        if self.signum is not None:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def leave(self) -> None:
        """Last thing a stopped run does: ignore further signals. Python's own teardown puts back the
        default handlers, so a second signal landing there killed the finished process (exit -2 or -15
        instead of 130 or 143, seen in CI); an ignored signal stays ignored through that teardown."""
        if self.signum is None:
            return
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            what = f"saving step {self.saving_step}, then stopping" if self.saving_step is not None else \
                "stopping after this step with a checkpoint"
            _say(f"\n{name}: {what} (run the same command to resume).\n")
            return
        what = f"saving step {self.saving_step}" if self.saving_step is not None else \
            "finishing this step to save it"
        _say(f"\n{name} again: {what}, please wait (kill -9 abandons the work since the last checkpoint).\n")

    @contextlib.contextmanager
    def saving(self, step: int) -> Iterator[None]:
        """Marks a save in progress, so a signal meanwhile says which step it waits for."""
        self.saving_step = step
        try:
            yield
        finally:
            self.saving_step = None
