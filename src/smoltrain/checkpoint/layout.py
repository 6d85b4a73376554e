"""Where a run's files live, behind one interface chosen once when the run dir is locked (open_run_dir).

`LocalLayout`: one run dir that every rank sees (one process, one machine, or a shared filesystem); every
rank writes its optimizer part straight into rank 0's staging dir. `NodeLayout`: no shared filesystem,
checkpoint.remote set: every node keeps a run dir of its own, ranks on other nodes upload their parts to
the store for rank 0 to fetch, and on resume each node fetches the chosen checkpoint from the store. The
checkpointer, resume and the data setup call the same methods on either (torchtitan's CheckpointStorage
is the model), so the one-process save reads straight through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from smoltrain import distributed as dist_io
from smoltrain import storage
from smoltrain.checkpoint import state as ckpt_io
from smoltrain.checkpoint.discovery import step_dir, step_of
from smoltrain.checkpoint.optimizer import OPTIMIZER_DIR
from smoltrain.checkpoint.remote import Remote, RunMirror
from smoltrain.checkpoint.rundir import RunLock, leads_node_dir, own_run_dir
from smoltrain.errors import TrainingError, UserError

if TYPE_CHECKING:
    from smoltrain.config import Config
    from smoltrain.data.tokenizer import Tokenizer
    from smoltrain.distributed import DistEnv


class LocalLayout:
    """One run dir every rank sees: rank 0 writes and finds checkpoints there, the others read them."""

    def __init__(self, run_dir: Path, dist: DistEnv, lock: RunLock, mirror: RunMirror | None):
        self.run_dir = run_dir
        self.dist = dist
        self.lock = lock  # held by rank 0 (and, with NodeLayout, by each node's first rank)
        self.mirror = mirror  # rank 0: checkpoint.remote / push_to_hub copies

    @property
    def leads_dir(self) -> bool:
        """This process prepares data and fetches checkpoints in its run dir; the others wait, then read."""
        return self.dist.is_main

    def stage(self, step: int) -> Path:
        """Rank 0: the private staging dir of step N (a same-named corrupt checkpoint is set aside first)."""
        return ckpt_io.begin_train_checkpoint(self.run_dir, step)

    @contextlib.contextmanager
    def write_parts(self, step: int, staging: Path) -> Iterator[Path]:
        """Where this rank writes its optimizer part: rank 0's staging dir. A failed save removes it."""
        with ckpt_io.discard_on_error(staging if self.dist.is_main else None):
            yield staging / OPTIMIZER_DIR

    def gather_parts(self, step: int, part: Path | None, staging: Path) -> list[str]:
        """Every rank's part is in rank 0's staging dir once all are here; none is on the store yet."""
        dist_io.barrier()
        return []

    def check_resume_from(self, explicit: str | None) -> None:
        """train.resume_from names a path every rank can read."""

    def from_store(self, found: Path | None) -> Path | None:
        """Rank 0: with no local checkpoint, the newest one on checkpoint.remote (downloaded), if any."""
        if found is None and self.mirror is not None:
            return self.mirror.restore(self.run_dir)
        return found

    def share(self, ckpt: Path) -> None:
        """Rank 0: make the chosen checkpoint readable by every rank (it already is)."""

    def fetch(self, found: Path | None) -> Path | None:
        """Every rank: the resume checkpoint in its own run dir (rank 0's, here)."""
        return found

    def check_same_data(self, tokenizer: Tokenizer, paths: dict[str, Path]) -> None:
        """Every rank reads the data rank 0 prepared: nothing to compare."""

    def close(self) -> None:
        """Release the run dir (the kernel would at exit; in-process callers get it back now)."""
        self.lock.release()


class NodeLayout(LocalLayout):
    """Each node its own run dir; the store (checkpoint.remote) is where the nodes exchange parts."""

    def __init__(self, run_dir: Path, dist: DistEnv, lock: RunLock, mirror: RunMirror | None, remote: Remote,
                 sees_main_dir: bool, keep_last: int):
        super().__init__(run_dir, dist, lock, mirror)
        self.keep_last = keep_last  # checkpoint.keep_last, for the copies fetched into this node's run dir
        self.remote = remote  # every rank: where parts go up and checkpoints come down
        self.sees_main_dir = sees_main_dir  # this process shares rank 0's node (and run dir)

    @property
    def leads_dir(self) -> bool:
        return leads_node_dir(self.dist, self.sees_main_dir)

    def stage(self, step: int) -> Path:
        staging = super().stage(step)
        self.remote.invalidate(step)  # before any node uploads its part of this step
        return staging

    @contextlib.contextmanager
    def write_parts(self, step: int, staging: Path) -> Iterator[Path]:
        """A rank on another node writes its part into a private staging dir of its own run dir."""
        if self.sees_main_dir:
            with super().write_parts(step, staging) as part_dir:
                yield part_dir
            return
        own = storage.make_staging(step_dir(self.run_dir, step))
        with ckpt_io.discard_on_error(own):
            yield own / OPTIMIZER_DIR
        storage.drop_staging(own)

    def gather_parts(self, step: int, part: Path | None, staging: Path) -> list[str]:
        """Each rank on another node uploads its part to the store, then rank 0 fetches every such part
        into its staging dir. Returns the names already on the store."""
        record = None
        error = None
        if part is not None and not self.sees_main_dir:
            name = f"{OPTIMIZER_DIR}/{part.name}"
            try:
                record = (name, self.remote.upload_part(part, step, name))
            except Exception as e:  # every store raises its own classes
                error = f"rank {self.dist.rank} could not upload its part of step {step} to {self.remote.url} ({e})"
        sent = dist_io.all_ranks((record, error))
        records = [r for r, _ in sent if r is not None]

        def fetch() -> str | None:
            try:
                for name, rec in records:
                    self.remote.get_part(step, name, storage.contained(staging, name, "node part"), rec)
            except Exception as e:  # every store raises its own classes
                return f"rank 0 could not fetch the other nodes' parts of step {step} from {self.remote.url} ({e})"
            return None

        errors = [e for _, e in sent if e] or [dist_io.on_main(fetch)]
        if errors[0]:
            raise TrainingError(f"{errors[0]}; nothing of step {step} was committed, the previous checkpoint is "
                                "the newest complete one. Check checkpoint.remote, then run the same command.")
        return [name for name, _ in records]

    def check_resume_from(self, explicit: str | None) -> None:
        if explicit:
            raise UserError("train.resume_from names a checkpoint on rank 0's machine, which the other nodes (each "
                            "with a run dir of its own) cannot read. Resume without it (from the newest checkpoint "
                            "on checkpoint.remote), or from a run.dir every node shares.")

    def from_store(self, found: Path | None) -> Path | None:
        """This node may not have been rank 0's before: the store may hold a newer checkpoint."""
        if found is None:
            return self.mirror.restore(self.run_dir)
        return self.mirror.restore(self.run_dir, after=step_of(found)) or found

    def share(self, ckpt: Path) -> None:
        """The other nodes fetch the chosen checkpoint from the store: make sure it is there."""
        self.mirror.publish(ckpt)

    def fetch(self, found: Path | None) -> Path | None:
        """Each other node's first rank cleans its debris (it holds its node's lock) and fetches the chosen
        checkpoint into its run dir; the all-gather is also the barrier before any rank reads it."""
        step = None if found is None else step_of(found)

        def fetch_here() -> Path | None:
            if self.sees_main_dir:
                return found
            if self.leads_dir:
                ckpt_io.clean_debris(self.run_dir)
                if step is not None:
                    self.remote.fetch(step, self.run_dir)
                    ckpt_io.retain(self.run_dir, self.keep_last)
            return None if step is None else step_dir(self.run_dir, step)

        return dist_io.all_or_none(fetch_here)

    def check_same_data(self, tokenizer: Tokenizer, paths: dict[str, Path]) -> None:
        """Nodes with run dirs of their own each prepared the data: refuse to train if they disagree."""
        prints = dist_io.all_ranks(data_fingerprint(tokenizer, paths))
        differ = [r for r, p in enumerate(prints) if p != prints[0]]
        if differ:
            raise UserError(f"The nodes prepared different data: rank {differ[0]}'s tokenizer or datasets differ "
                            "from rank 0's (each node keeps its own run.dir and prepares from its own copy of the "
                            "sources). Give every node the same sources and tokenizer, or a shared run.data_dir.")


def data_fingerprint(tokenizer: Tokenizer, paths: dict[str, Path]) -> dict:
    """What must agree between nodes that prepared their data apart: the tokenizer's files, and each
    dataset's splits (tokens, documents, shard sizes) from its meta.json; paths and times may differ."""
    import json

    from smoltrain.data.tokenizer import TOKENIZER_FILES

    files = [tokenizer.directory / n for n in TOKENIZER_FILES]
    found = {"tokenizer": {p.name: storage.sha256_file(p) for p in files if p.is_file()}}
    for name, path in sorted(paths.items()):
        found[name] = json.loads((path / "meta.json").read_text())["splits"]
    return found


def open_run_dir(cfg: Config, dist: DistEnv, recipe: str | Path | None = None) -> LocalLayout:
    """Lock the run dir, open the mirror (rank 0) and choose the layout, once, before anything is read.

    Every store is checked here (exit 2 before data prep or training); a refusal releases the lock.
    """
    run_dir = Path(cfg.run.dir)
    lock, sees_main_dir, separate = own_run_dir(run_dir, dist, separate_ok=bool(cfg.checkpoint.remote), recipe=recipe)
    try:
        mirror = dist_io.all_or_none(lambda: RunMirror.from_config(cfg) if dist.is_main else None)
        if not separate:
            return LocalLayout(run_dir, dist, lock, mirror)

        def node_remote() -> Remote:
            if dist.is_main:
                return mirror.remote
            remote = Remote(cfg.checkpoint.remote, cfg.checkpoint.remote_options)
            if leads_node_dir(dist, sees_main_dir):
                remote.check()
            return remote

        remote = dist_io.all_or_none(node_remote)
        return NodeLayout(run_dir, dist, lock, mirror, remote, sees_main_dir, cfg.checkpoint.keep_last)
    except BaseException:
        lock.release()
        raise
