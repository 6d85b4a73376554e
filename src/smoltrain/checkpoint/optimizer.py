"""The optimizer's state in a training checkpoint, keyed by parameter name so it loads at any world size.

One process writes it whole (optimizer/state.safetensors). Under torchrun every rank writes its own
part (optimizer/shard-*.safetensors) through torch's distributed checkpoint and its safetensors storage:
no rank gathers the whole state, and a rank on a node without the run dir can upload its part itself.
Both forms are safetensors plus optimizer.json (param groups, non-tensor values): nothing is unpickled.
Loading either form reshards it to the current world size and parallelism.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from smoltrain import distributed as dist_io
from smoltrain.errors import UserError
from smoltrain.hf.interop import save_tensors

OPTIMIZER_DIR = "optimizer"
OPTIM_TENSORS = "state.safetensors"
OPTIM_JSON = "optimizer.json"


def _full_options(model: torch.nn.Module):
    """Full (unsharded) state dicts under FSDP2, gathered to rank 0 on the CPU; plain ones otherwise."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    sharded = dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in model.parameters())
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if sharded else None


class OptimizerState:
    """The optimizer's state keyed by parameter name (torch's distributed state-dict API), as a Stateful.

    `full`: the whole (unsharded) state on one process; otherwise this rank's own (DTensors under FSDP).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self, full: bool = False) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=_full_options(self.model) if full else None)

    def load_state_dict(self, state: dict, full: bool = False) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True) if full and _full_options(self.model) is not None else None
        set_optimizer_state_dict(self.model, self.optimizer, state, options=opts)


def _flatten(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """{"fqn:key": tensor} for the tensors, and the JSON layout that names them (or holds plain values)."""
    tensors = {}
    layout = {}
    for fqn, entries in state["state"].items():
        layout[fqn] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}:{key}"] = value
                layout[fqn][key] = {"tensor": f"{fqn}:{key}"}
            else:
                layout[fqn][key] = {"value": value}
    return tensors, layout


def _unflatten(layout: dict, tensors: dict[str, torch.Tensor]) -> dict:
    return {fqn: {key: tensors[rec["tensor"]] if "tensor" in rec else rec["value"] for key, rec in entries.items()}
            for fqn, entries in layout.items()}


def _write_json(directory: Path, layout: dict, param_groups: list, shards: list[str] | None) -> None:
    doc = {"format": "smoltrain-optimizer", "version": 2 if shards is not None else 1, "state": layout,
           "param_groups": param_groups}
    if shards is not None:
        doc["shards"] = shards
    (directory / OPTIM_JSON).write_text(json.dumps(doc, indent=2))


def save_optimizer(directory: Path, optim: OptimizerState, main: bool, world_size: int,
                   part_dir: Path | None = None) -> Path | None:
    """Every rank calls this. One process: the whole state into `directory` (= RUN/.../optimizer).

    Under torchrun each rank writes its part into `part_dir` (`directory` when it sees rank 0's staging
    dir; a private dir of its own on another node) and rank 0 writes optimizer.json naming every part.
    Returns the part this rank wrote (None when it had nothing to write, and for one process).
    """
    if world_size == 1:
        state = optim.state_dict(full=True)
        tensors, layout = _flatten(state)
        directory.mkdir(exist_ok=True)
        save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / OPTIM_TENSORS)
        _write_json(directory, layout, state["param_groups"], None)
        return None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    part_dir = part_dir or directory
    part_dir.mkdir(parents=True, exist_ok=True)
    state = optim.state_dict()  # sharded (DTensors) under FSDP, replicated under DDP
    tensors, layout = _flatten(state)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(part_dir), save_distributed=True))
    # DCP names each rank's file shard-{rank + 1}-...; a rank whose tensors another rank also holds
    # (replicated under DDP) may write none
    mine = sorted(part_dir.glob(f"shard-{torch.distributed.get_rank() + 1:05d}-*.safetensors"))
    names = sorted(n for part in dist_io.all_ranks([p.name for p in mine]) for n in part)
    if main:
        _write_json(directory, layout, state["param_groups"], names)
    return mine[0] if mine else None


def load_optimizer(ckpt: Path, optim: OptimizerState) -> None:
    """Every rank: whole state (every rank keeps its shard of it) or per-rank parts (resharded by DCP)."""
    directory = ckpt / OPTIMIZER_DIR
    try:
        doc = json.loads((directory / OPTIM_JSON).read_text())
        if "shards" in doc:
            _load_parts(directory, doc, optim)
        else:
            _load_whole(directory, doc, optim)
    except UserError:
        raise
    except Exception as e:  # a consistent manifest does not make the content readable
        raise UserError(f"The optimizer state in {directory} is unreadable or does not fit this model "
                        f"({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint.") from None


def _load_whole(directory: Path, doc: dict, optim: OptimizerState) -> None:
    tensors = load_file(str(directory / OPTIM_TENSORS))
    optim.load_state_dict({"state": _unflatten(doc["state"], tensors), "param_groups": doc["param_groups"]}, full=True)


def _load_parts(directory: Path, doc: dict, optim: OptimizerState) -> None:
    """The current optimizer's own (fresh) state is the target: DCP fills each rank's shards in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    missing = [n for n in doc["shards"] if not (directory / n).is_file()]
    if missing:
        raise UserError(f"The optimizer state in {directory} is incomplete: {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing (each rank of the run that saved it "
                        "wrote one part); resume from a complete copy, e.g. the one on checkpoint.remote.")
    target, _ = _flatten(optim.state_dict())
    wanted = {rec["tensor"] for entries in doc["state"].values() for rec in entries.values() if "tensor" in rec}
    if set(target) != wanted:
        raise ValueError(f"saved state has {len(wanted)} tensors, this optimizer {len(target)}")
    dcp.load(target, storage_reader=HuggingFaceStorageReader(str(directory)))
    optim.load_state_dict({"state": _unflatten(doc["state"], target), "param_groups": doc["param_groups"]})
