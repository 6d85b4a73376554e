"""The trainer's checkpoints: save each step once, restore on resume, check the disk before writing.

Every rank takes part in a save (FSDP gathers the weights, a stream gathers per-rank positions, each
rank writes its part of the optimizer state) and calls the same collectives in the same order; rank 0
writes the rest, commits, tells the remote mirror and applies retention. When nodes keep run dirs of
their own (no shared filesystem, checkpoint.remote set), a rank on another node uploads its part to the
store itself and rank 0 fetches it, so rank 0's checkpoint is whole. The loop counters stay the
trainer's: it passes them in and reads them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smoltrain import distributed as dist_io
from smoltrain import storage
from smoltrain.checkpoint import state as ckpt_io
from smoltrain.checkpoint.optimizer import OPTIMIZER_DIR, load_optimizer, save_optimizer
from smoltrain.data.tokenizer import TOKENIZER_FILES
from smoltrain.errors import TrainingError, UserError
from smoltrain.runinfo import environment
from smoltrain.storage import tree_size

if TYPE_CHECKING:
    from smoltrain.checkpoint.remote import Remote, RunMirror
    from smoltrain.checkpoint.signals import StopRequest
    from smoltrain.config import CheckpointConfig
    from smoltrain.data.tokenizer import Tokenizer
    from smoltrain.distributed import DistEnv
    from smoltrain.model.llama import SmolLM2


class Checkpointer:
    """What one run saves (model, optimizer, scaler, loader, tokenizer) and where, plus the save state."""

    def __init__(self, run_dir: Path, ck: CheckpointConfig, dist: DistEnv, device: torch.device, *,
                 model: SmolLM2, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 loader, tokenizer: Tokenizer, mirror: RunMirror | None, stop: StopRequest,
                 config_yaml: str, global_batch: int, streaming: bool, remote: Remote | None = None):
        self.run_dir = run_dir
        self.ck = ck
        self.dist = dist
        self.device = device
        self.model = model  # unwrapped: what we save
        self.optimizer = optimizer
        self.scaler = scaler
        self.loader = loader
        self.tokenizer = tokenizer
        self.mirror = mirror
        self.remote = remote  # where ranks on other nodes put their parts (nodes with run dirs of their own)
        self.stop = stop
        self.config_yaml = config_yaml
        self.global_batch = global_batch
        self.streaming = streaming  # a stream's position is per rank
        self.saved_step: int | None = None
        self.checkpoint_bytes: int | None = None

    def restore(self, ckpt: Path) -> dict:
        """Optimizer (resharded to this world size), scaler, loader position and RNG from `ckpt`; returns
        its state (train_state holds the loop counters for the trainer)."""
        state = ckpt_io.load_train_state(ckpt)
        load_optimizer(ckpt, self.model, self.optimizer)
        ckpt_io.check_finite(ckpt, self.optimizer)
        if self.scaler is not None and state["extra"].get("scaler"):
            self.scaler.load_state_dict(state["extra"]["scaler"])
        self.loader.load_state_dict(self._rank_loader_state(state["train_state"]["loader"]))
        ckpt_io.set_rng_state(*state["rng"])
        # that checkpoint exists: a stop before the next step saves nothing
        self.saved_step = state["train_state"]["step"]
        return state

    def _rank_loader_state(self, loader: dict) -> dict:
        if "per_rank" not in loader:
            return loader
        if len(loader["per_rank"]) != self.dist.world_size:
            raise UserError("A streaming run resumes only at the world size it was saved with "
                            f"({len(loader['per_rank'])} processes).")
        return loader["per_rank"][self.dist.rank]

    def save(self, step: int, tokens_seen: int, rewarm_from: int | None) -> Path | None:
        """Save this step once: a stop right after a scheduled save (or a resume) has nothing to add."""
        if self.saved_step == step:
            return ckpt_io.step_dir(self.run_dir, step) if self.dist.is_main else None
        with self.stop.saving(step):  # a signal meanwhile is acted on after the commit
            path = self._write_checkpoint(step, tokens_seen, rewarm_from)
        self.saved_step = step
        return path

    def _write_checkpoint(self, step: int, tokens_seen: int, rewarm_from: int | None) -> Path | None:
        """Every rank gathers the weights and writes its optimizer part; rank 0 writes the rest and commits."""
        main = self.dist.is_main
        staging = [None]
        if main:
            self.check_disk()
            staging[0] = ckpt_io.begin_train_checkpoint(self.run_dir, step)
            if self.dist.separate_dirs:  # before any node uploads its part of this step
                self.remote.invalidate(step)
        if self.dist.world_size > 1:  # the staging name is private to rank 0's process: tell the others
            torch.distributed.broadcast_object_list(staging, src=0)
        staging = staging[0]
        own = None if self.dist.sees_main_dir else storage.make_staging(ckpt_io.step_dir(self.run_dir, step))
        path = None
        with ckpt_io.discard_on_error(staging if main else own):  # a full disk leaves no staging behind
            weights = dist_io.full_state_dict(self.model, self.dist)  # collective under FSDP
            loader_state = self._loader_state()  # collective for streams (per-rank positions)
            part = save_optimizer(staging / OPTIMIZER_DIR, self.model, self.optimizer, main, self.dist.world_size,
                                  own / OPTIMIZER_DIR if own else None)
            uploaded = self._gather_parts(step, part, staging)
            if own is not None:
                storage.drop_staging(own)
            if main:
                state = {"step": step, "tokens_seen": tokens_seen, "global_batch": self.global_batch,
                         "world_size": self.dist.world_size, "loader": loader_state,
                         "rewarm_from": rewarm_from, "env": environment(self.device, self.dist.world_size)}
                extra = {"scaler": self.scaler.state_dict() if self.scaler else None}
                path = ckpt_io.finish_train_checkpoint(staging, self.run_dir, step, self.model.config,
                                                       weights, self.tokenizer, self.config_yaml, extra, state,
                                                       export_hf=self.ck.export_hf)
        if main:
            self._committed(path, step, uploaded)
        dist_io.barrier()
        return path

    def _gather_parts(self, step: int, part: Path | None, staging: Path) -> list[str]:
        """Nodes with run dirs of their own: each rank there uploads its optimizer part to the store, then
        rank 0 fetches every such part into its staging dir. Returns the names already on the store."""
        if not self.dist.separate_dirs:
            dist_io.barrier()
            return []
        record = None
        error = None
        if part is not None and not self.dist.sees_main_dir:
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

    def _committed(self, path: Path, step: int, uploaded: list[str]) -> None:
        """Rank 0 after a commit: measure it, hand it to the mirror, then apply retention."""
        self.checkpoint_bytes = tree_size(path)  # the real size, for the next free-space check
        if self.mirror is not None:  # before retention: a checkpoint being uploaded is never the one deleted
            self.mirror.checkpoint_saved(path, step, self.run_dir, uploaded)
        ckpt_io.retain(self.run_dir, self.ck.keep_last)

    def _loader_state(self) -> dict:
        """A packed loader's state is the same on every rank; a stream's position is per rank."""
        state = self.loader.state_dict()
        if not self.streaming or self.dist.world_size == 1:
            return state
        states = [None] * self.dist.world_size
        torch.distributed.all_gather_object(states, state)
        return {"per_rank": states}

    def check_disk(self) -> None:
        """The next checkpoint's size: measured from the last one written, estimated before the first."""
        if self.checkpoint_bytes is None:
            tok_files = [self.tokenizer.directory / n for n in TOKENIZER_FILES]
            tok_bytes = sum(p.stat().st_size for p in tok_files if p.exists())
            shapes = {name: p.numel() for name, p in self.model.named_parameters()}  # a tied weight once
            self.checkpoint_bytes = ckpt_io.checkpoint_bytes(shapes, self.ck.export_hf, tok_bytes)
        ckpt_io.check_free_space(self.run_dir, self.checkpoint_bytes, self.ck.min_free_gb)
