"""What every collaborator of one training run shares (config, processes, device, precision, console), given
once as a small object instead of ten loose arguments; and the Stateful protocol the checkpointer saves."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from smoltrain.device import autocast

if TYPE_CHECKING:
    from smoltrain.config import Config
    from smoltrain.distributed import DistEnv


class Stateful(Protocol):
    """A part of the run whose state a checkpoint holds (torchtitan's pattern): loop counters, loader,
    optimizer, scaler, RNG. The checkpointer decides which file each part's state goes into."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """One run's fixed facts: the resolved config, this process's place, its device and autocast dtype."""

    cfg: Config
    dist: DistEnv
    device: torch.device
    amp_dtype: torch.dtype
    say: Callable[[str], None]  # a line on rank 0's console (through the progress bar when there is one)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro x accumulation x world size."""
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * self.dist.world_size

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)()
