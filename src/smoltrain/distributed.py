"""torchrun process groups and model wrapping. Parallelism lives here, never in model code."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from smoltrain.errors import UserError

T = TypeVar("T")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp
    node: int = 0  # torchrun's GROUP_RANK

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.strategy in ("ddp", "fsdp")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(strategy: str, device_type: str) -> DistEnv:
    """Read torchrun's environment and start the process group (NCCL on CUDA, gloo on CPU)."""
    if not launched_by_torchrun():
        if strategy in ("ddp", "fsdp"):
            raise UserError(f"parallel.strategy={strategy} needs a torchrun launch, e.g. "
                            "torchrun --standalone --nproc_per_node 2 -m smoltrain train --config FILE "
                            "(or set parallel.strategy=auto to train in one process).")
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                  node=int(os.environ.get("GROUP_RANK", 0)))
    env.strategy = "ddp" if strategy in ("auto", "single") else strategy
    if strategy == "single" and env.world_size > 1:
        raise UserError("parallel.strategy=single under torchrun with several processes; use ddp or fsdp.")
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        _init_group(backend)
    return env


def _init_group(backend: str) -> None:
    """init_process_group, on a store namespace of its own under a torchrun restart.

    torchrun's agent keeps one TCP store for the whole job; without a per-attempt prefix a restarted
    group reads the dead attempt's gloo/NCCL addresses from it and fails with "Connection refused".
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend)
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"smoltrain/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{attempt}/", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)


def teardown() -> None:
    """Leave the group cleanly, so a torchrun restart re-forms it from a fresh store."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to release  # noqa: BLE001
            pass


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand every rank its result, or its UserError (every rank then raises it).

    Without this, a refusal on rank 0 leaves the other ranks blocked in the next collective.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except UserError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise UserError(box[1])
    return box[0]


def all_ranks(value: object) -> list:
    """Every rank's `value`, in rank order (one element outside torchrun)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def agree_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks: one tiny all-reduce, so every rank takes the same decision."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def main_first(fn: Callable[[], T], first: bool) -> T:
    """`fn()` on the ranks that make what the others need first (rank 0, or each node's first rank when
    nodes keep their own run dirs: they fetch, train the tokenizer, prepare), then, after a barrier, on
    the others, which read what was made. A refusal on any rank is raised on every rank."""
    made = all_or_none(fn if first else _nothing)
    read = all_or_none(_nothing if first else fn)
    return made if first else read


def _nothing() -> None:
    return None


def all_or_none(fn: Callable[[], T]) -> T:
    """`fn()` on this rank; a UserError on any rank is raised on every rank (the all-gather that carries
    the errors is also a barrier). Without it a refusal on one rank leaves the others in a collective."""
    result = None
    error = None
    try:
        result = fn()
    except UserError as e:
        error = str(e)
    errors = [e for e in all_ranks(error) if e is not None]
    if errors:
        raise UserError(errors[0])
    return result


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            x /= dist.get_world_size()
    return x


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP for `ddp`; FSDP2 `fully_shard` per decoder layer and at the root for `fsdp`."""
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if env.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from the shards under FSDP; all ranks must call)."""
    if env.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)  # fsdp runs only under torchrun (setup refuses it elsewhere)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
