"""The trainer's checkpoints: save each step once, restore on resume, check the disk before writing.

The run's stateful parts register here (torchtitan's pattern): `train` (the loop counters: the Trainer
itself), `loader`, `optimizer`, `scaler` (None without fp16) and `rng`, each with state_dict() and
load_state_dict(); this module decides which file each part's state goes into. Every rank takes part in
a save (FSDP gathers the weights, a stream gathers per-rank positions, each rank writes its part of the
optimizer state) and calls the same collectives in the same order; rank 0 writes the rest, commits,
tells the mirror and applies retention. Where the files go (one run dir, or one per node with parts
exchanged through the store) is the layout's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from smoltrain import distributed as dist_io
from smoltrain.checkpoint import state as ckpt_io
from smoltrain.checkpoint.discovery import step_dir
from smoltrain.checkpoint.optimizer import OPTIMIZER_DIR, OptimizerState, load_optimizer, save_optimizer
from smoltrain.data.tokenizer import TOKENIZER_FILES
from smoltrain.errors import UserError
from smoltrain.runinfo import environment
from smoltrain.storage import tree_size

if TYPE_CHECKING:
    from smoltrain.checkpoint.context import RunContext, Stateful
    from smoltrain.checkpoint.layout import LocalLayout
    from smoltrain.checkpoint.signals import StopRequest
    from smoltrain.data.tokenizer import Tokenizer
    from smoltrain.model.llama import SmolLM2


class Checkpointer:
    """What one run saves (model, tokenizer and the registered stateful parts) and where, plus the save state."""

    def __init__(self, run: RunContext, layout: LocalLayout, model: SmolLM2, tokenizer: Tokenizer,
                 states: dict[str, Stateful | None], stop: StopRequest):
        self.run = run
        self.layout = layout
        self.model = model  # unwrapped (FSDP shards it in place): what we save
        self.tokenizer = tokenizer
        self.states = states  # train, loader, optimizer (an OptimizerState), scaler (or None), rng
        self.stop = stop
        self.saved_step: int | None = None
        self.checkpoint_bytes: int | None = None

    @property
    def optimizer(self) -> OptimizerState:
        return self.states["optimizer"]

    def restore(self, ckpt: Path) -> None:
        """Every registered part from `ckpt` (the optimizer resharded to this world size)."""
        state = ckpt_io.load_train_state(ckpt)
        load_optimizer(ckpt, self.optimizer)
        ckpt_io.check_finite(ckpt, self.optimizer.optimizer)
        if self.states["scaler"] is not None and state["extra"].get("scaler"):
            self.states["scaler"].load_state_dict(state["extra"]["scaler"])
        self.states["loader"].load_state_dict(self._rank_loader_state(state["train_state"]["loader"]))
        self.states["rng"].load_state_dict(state["rng"])
        self.states["train"].load_state_dict(state["train_state"])
        # that checkpoint exists: a stop before the next step saves nothing
        self.saved_step = state["train_state"]["step"]

    def _rank_loader_state(self, loader: dict) -> dict:
        if "per_rank" not in loader:
            return loader
        if len(loader["per_rank"]) != self.run.dist.world_size:
            raise UserError("A streaming run resumes only at the world size it was saved with "
                            f"({len(loader['per_rank'])} processes).")
        return loader["per_rank"][self.run.dist.rank]

    def save(self) -> Path | None:
        """Save the loop's current step once: a stop right after a scheduled save (or a resume) has nothing
        to add. Every rank calls it; rank 0 gets the path."""
        step = self.states["train"].state_dict()["step"]
        if self.saved_step == step:
            return step_dir(self.layout.run_dir, step) if self.run.dist.is_main else None
        with self.stop.saving(step):  # a signal meanwhile is acted on after the commit
            path = self._write_checkpoint(step)
        self.saved_step = step
        return path

    def _write_checkpoint(self, step: int) -> Path | None:
        """Every rank gathers the weights and writes its optimizer part; rank 0 writes the rest and commits."""
        dist = self.run.dist
        staging = self._stage(step)
        path = None
        with self.layout.write_parts(step, staging) as part_dir:  # a full disk leaves no staging behind
            weights = dist_io.full_state_dict(self.model, dist)  # collective under FSDP
            loader_state = self._loader_state()  # collective for streams (per-rank positions)
            part = save_optimizer(staging / OPTIMIZER_DIR, self.optimizer, dist.is_main, dist.world_size, part_dir)
            uploaded = self.layout.gather_parts(step, part, staging)
            if dist.is_main:
                path = self._finish(staging, step, weights, loader_state)
        if dist.is_main:
            self._committed(path, step, uploaded)
        dist_io.barrier()
        return path

    def _stage(self, step: int) -> Path:
        """Rank 0 checks the disk and makes the private staging dir, then tells the other ranks its name."""
        staging = [None]
        if self.run.dist.is_main:
            self.check_disk()
            staging[0] = self.layout.stage(step)
        if self.run.dist.world_size > 1:
            torch.distributed.broadcast_object_list(staging, src=0)
        return staging[0]

    def _finish(self, staging: Path, step: int, weights: dict, loader_state: dict) -> Path:
        """Rank 0: the loop counters, loader, scaler and RNG into their files, then the commit."""
        cfg = self.run.cfg
        dist = self.run.dist
        train = self.states["train"].state_dict()
        state = {"step": step, "tokens_seen": train["tokens_seen"], "global_batch": self.run.global_batch,
                 "world_size": dist.world_size, "loader": loader_state, "rewarm_from": train["rewarm_from"],
                 "env": environment(self.run.device, dist.world_size)}
        scaler = self.states["scaler"]
        extra = {"scaler": scaler.state_dict() if scaler else None}
        return ckpt_io.finish_train_checkpoint(staging, self.layout.run_dir, step, self.model.config, weights,
                                               self.tokenizer, cfg.to_yaml(), extra, state,
                                               self.states["rng"].state_dict(), export_hf=cfg.checkpoint.export_hf)

    def _committed(self, path: Path, step: int, uploaded: list[str]) -> None:
        """Rank 0 after a commit: measure it, hand it to the mirror, then apply retention."""
        self.checkpoint_bytes = tree_size(path)  # the real size, for the next free-space check
        mirror = self.layout.mirror
        if mirror is not None:  # before retention: a checkpoint being uploaded is never the one deleted
            mirror.checkpoint_saved(path, step, self.layout.run_dir, uploaded)
        ckpt_io.retain(self.layout.run_dir, self.run.cfg.checkpoint.keep_last)

    def _loader_state(self) -> dict:
        """A packed loader's state is the same on every rank; a stream's position is per rank."""
        state = self.states["loader"].state_dict()
        world_size = self.run.dist.world_size
        if not self.run.cfg.data.streaming or world_size == 1:
            return state
        states = [None] * world_size
        torch.distributed.all_gather_object(states, state)
        return {"per_rank": states}

    def check_disk(self) -> None:
        """The next checkpoint's size: measured from the last one written, estimated before the first."""
        ck = self.run.cfg.checkpoint
        if self.checkpoint_bytes is None:
            tok_files = [self.tokenizer.directory / n for n in TOKENIZER_FILES]
            tok_bytes = sum(p.stat().st_size for p in tok_files if p.exists())
            shapes = {name: p.numel() for name, p in self.model.named_parameters()}  # a tied weight once
            self.checkpoint_bytes = ckpt_io.checkpoint_bytes(shapes, ck.export_hf, tok_bytes)
        ckpt_io.check_free_space(self.layout.run_dir, self.checkpoint_bytes, ck.min_free_gb)
