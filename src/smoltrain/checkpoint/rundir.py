"""One process owns a run dir: an OS lock, the shared-filesystem check under torchrun, the config history.

The lock is an flock on RUN/.smoltrain.lock: the kernel drops it when the holder dies, so a `kill -9`
never leaves a stale lock. The holder writes its PID and host into the file (a second trainer names
them) and empties it again on a clean exit.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from smoltrain import distributed as dist_io
from smoltrain import storage
from smoltrain.config import flatten_dotted
from smoltrain.errors import UserError
from smoltrain.storage import output_record

if TYPE_CHECKING:
    from smoltrain.distributed import DistEnv

LOCK_NAME = ".smoltrain.lock"
HISTORY_NAME = "config_history.jsonl"


def _release(fd: int) -> None:
    """Empty the holder record, then close (closing drops the flock)."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def _read_holder(fd: int) -> dict:
    """The holder's record; it may be a moment from being written, so retry briefly."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        try:
            return json.loads(raw)
        except ValueError:
            time.sleep(0.05)
    return {}


class RunLock:
    """An exclusive, kernel-released lock on a run dir; `token` lets other nodes check they see the file."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._finalizer = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            since = f", since {holder['started']}" if holder.get("started") else ""
            raise UserError(f"{self.path.parent} is in use by another smoltrain train ({who}{since}). Two trainers "
                            "on one run dir would overwrite each other's checkpoints and logs: wait for it to "
                            "finish, stop it (it saves a checkpoint on SIGTERM), or use another run.dir.") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "token": self.token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._finalizer = weakref.finalize(self, _release, fd)
        return self

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive


def check_run_dir(run_dir: Path, recipe: str | Path | None = None) -> None:
    """Refuse (exit 2) a run.dir that exists and is not a smoltrain run dir but holds files: train writes
    config.yaml, env.json and metrics.jsonl there and would overwrite or rewind a user's files of those names.
    A run dir is recognised by what every train leaves in it (its lock file, config history, checkpoints);
    the recipe itself (--config RUN/config.yaml) does not count: it is never rewritten."""
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"run.dir {path} is a file, not a directory; choose another run.dir.")
    if not path.is_dir() or any((path / m).exists() for m in (LOCK_NAME, HISTORY_NAME, "checkpoints")):
        return
    skip = Path(recipe).expanduser().resolve() if recipe else None
    try:
        foreign = sorted(p.name for p in path.iterdir() if p.resolve() != skip and not _smoltrain_output(p))
    except OSError as e:
        raise UserError(f"run.dir {path} cannot be read ({e.strerror}); fix its permissions or choose another.") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"run.dir {path} exists and holds files smoltrain did not write ({shown}); train never "
                        "writes into such a directory (it would overwrite or rewind files named config.yaml, "
                        "env.json, metrics.jsonl). Choose a new or empty run.dir, or move those files away.")


def _smoltrain_output(p: Path) -> bool:
    """A directory another smoltrain command published (e.g. `prepare --out RUN/data` before training)."""
    return p.is_dir() and output_record(p) is not None


def sees_lock(run_dir: Path, token: str) -> bool:
    """True when this process reads the lock record rank 0 just wrote (the run dir is shared with it)."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text()).get("token") == token
    except (OSError, ValueError):
        return False


def settings_diff(old: dict, new: dict) -> list[str]:
    """Every resolved setting that differs between two config dicts, as `key: old -> new`."""
    a = flatten_dotted(old)
    b = flatten_dotted(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def record_segment(run_dir: Path, start_step: int, config: dict, changes: list[str]) -> None:
    """Append this segment (what it ran with, from which step) to RUN/config_history.jsonl.

    Segments that started at or after `start_step` were rewound along with metrics.jsonl, so they go:
    the history reads as the trajectory the run's checkpoints and metrics describe.
    """
    entry = {"start_step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes,
             "config": config}
    storage.rewrite_jsonl(Path(run_dir) / HISTORY_NAME, lambda r: r["start_step"] < start_step, [entry])


def own_run_dir(run_dir: Path, dist: DistEnv, separate_ok: bool,
                recipe: str | Path | None = None) -> tuple[RunLock, bool, bool]:
    """Rank 0 locks the run dir before anything in it is read or cleaned; every rank checks it sees it.

    A rank on a node that does not (no shared filesystem) is refused, unless `separate_ok`
    (checkpoint.remote is set): then every such node's first rank locks a run dir of the node's own.
    Returns (the lock, held by this process or not; whether this process sees rank 0's run dir; whether
    nodes keep run dirs of their own). A refusal on any rank is raised on every rank.
    """
    lock = RunLock(run_dir)
    dist_io.on_main(lambda: check_run_dir(run_dir, recipe))
    token = dist_io.on_main(lambda: lock.acquire().token)
    if dist.world_size == 1:
        return lock, True, False
    sees_main_dir = sees_lock(run_dir, token)
    seen = dist_io.all_ranks((sees_main_dir, socket.gethostname()))
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if not blind:
        return lock, True, False
    if not separate_ok:
        lock.release()
        raise UserError(f"run.dir {run_dir} is not shared between the nodes: {', '.join(blind)} cannot see the "
                        "lock file rank 0 wrote there. Either mount one filesystem on every node at the same path "
                        "(NFS, Lustre, ...), or set checkpoint.remote (e.g. s3://bucket/run) so that each node "
                        "keeps a run dir of its own and checkpoints meet on the store; see the README, "
                        "'Several machines'.")
    _lock_node_dirs(lock, run_dir, dist, sees_main_dir)
    return lock, sees_main_dir, True


def leads_node_dir(dist: DistEnv, sees_main_dir: bool) -> bool:
    """The process that prepares data and fetches checkpoints in its node's run dir for the others."""
    return dist.is_main or (not sees_main_dir and dist.local_rank == 0)


def _lock_node_dirs(lock: RunLock, run_dir: Path, dist: DistEnv, sees_main_dir: bool) -> None:
    """Each node without rank 0's run dir: its first rank locks the node's own; its other ranks must see it."""
    error = None
    leads = leads_node_dir(dist, sees_main_dir)
    if leads and not dist.is_main:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    tokens = dist_io.all_ranks((dist.node, lock.token if lock.held else None, error))
    errors = [e for _, _, e in tokens if e]
    if not errors and not sees_main_dir and not leads:
        mine = [t for node, t, _ in tokens[1:] if node == dist.node and t]
        if not (mine and sees_lock(run_dir, mine[0])):
            error = (f"rank {dist.rank} cannot see the run.dir lock file that its node's first rank wrote in "
                     f"{run_dir}: the ranks of one node must share its run dir.")
    errors = [e for e in dist_io.all_ranks(error) if e] or errors
    if errors:
        lock.release()
        raise UserError(errors[0])
