"""Which checkpoint a run resumes from, and what the resumed segment changes (rank 0, under the lock)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from smoltrain import distributed as dist_io
from smoltrain.checkpoint import state as ckpt_io
from smoltrain.checkpoint.rundir import settings_diff
from smoltrain.config import Config, DatasetConfig, get_dotted
from smoltrain.errors import UserError
from smoltrain.hf.interop import resolve_checkpoint
from smoltrain.storage import list_checkpoints, step_dir, step_of

if TYPE_CHECKING:
    from smoltrain.distributed import DistEnv


def find_resume(cfg: Config, dist: DistEnv, global_batch: int, mirror=None,
                remote=None) -> tuple[Path | None, list[str]]:
    """Every rank: the checkpoint to resume in its own run dir (None: start fresh), and what changed.

    Rank 0 picks it (pick_resume); nodes with run dirs of their own then fetch it from the store into
    theirs (`remote`), and clean their debris while their first rank holds their lock.
    """
    run_dir = Path(cfg.run.dir)
    found, changes = dist_io.on_main(lambda: pick_resume(cfg, run_dir, global_batch, mirror, dist.separate_dirs))
    if not dist.separate_dirs:
        return found, changes
    step = None if found is None else step_of(found)

    def fetch() -> Path | None:
        if dist.sees_main_dir:
            return found
        if dist.leads_dir:
            ckpt_io.clean_debris(run_dir)
            if step is not None:
                remote.fetch(step, run_dir)
                ckpt_io.retain(run_dir, cfg.checkpoint.keep_last)
        return None if step is None else step_dir(run_dir, step)

    return dist_io.all_or_none(fetch), changes  # also the barrier: every copy is there before any rank reads


def pick_resume(cfg: Config, run_dir: Path, global_batch: int, mirror=None,
                separate: bool = False) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume (None: start fresh) and the settings that differ from its config.

    With no local checkpoint, `mirror` (checkpoint.remote) may download the newest remote one. When
    nodes keep run dirs of their own (`separate`), the one chosen must be on the store, where they fetch it.

    Trajectory changes (model, data, seed, global batch) are refused unless train.allow_config_change;
    other changes (lr, schedule, weight decay, ...) are accepted and returned for the diff and history.
    """
    explicit = cfg.train.resume_from
    if explicit and separate:
        raise UserError("train.resume_from names a checkpoint on rank 0's machine, which the other nodes (each "
                        "with a run dir of its own) cannot read. Resume without it (from the newest checkpoint "
                        "on checkpoint.remote), or from a run.dir every node shares.")
    ckpt_io.clean_debris(run_dir)  # safe: this process holds the run dir's lock
    if explicit:
        if not Path(explicit).exists():
            raise UserError(f"train.resume_from {explicit} does not exist (refusing to start fresh).")
        found = resolve_checkpoint(explicit)
    else:
        found = ckpt_io.find_resume_checkpoint(run_dir, cfg.train.start_fresh)
        if found is None and mirror is not None:  # a fresh machine: the remote copy, if any
            found = mirror.restore(run_dir)
        elif separate:  # this node may not have been rank 0's before: the store may hold a newer one
            found = mirror.restore(run_dir, after=step_of(found)) or found
    if found is None:
        return None, []
    if separate:
        mirror.publish(found)
    state = ckpt_io.load_train_state(found)
    old = yaml.safe_load(state["config_yaml"])
    diffs = trajectory_diff(old, cfg.to_dict())
    saved_batch = state["train_state"].get("global_batch", global_batch)
    if saved_batch != global_batch:
        diffs.append(f"global batch (micro x accum x world): {saved_batch} -> {global_batch}")
    if diffs and not cfg.train.allow_config_change:
        raise UserError(f"Resuming from {found} with a config that changes the run's trajectory: "
                        + "; ".join(diffs) + ". Use another run.dir, or set train.allow_config_change=true.")
    step = state["train_state"]["step"]
    newer = [p.name for p in list_checkpoints(run_dir) if step_of(p) > step]
    if explicit and newer:  # saving over them would set valid checkpoints aside
        raise UserError(f"run.dir {run_dir} already holds checkpoints after step {step} ({', '.join(newer)}); "
                        "resuming there from train.resume_from would overwrite them. Use another run.dir.")
    return found, settings_diff(old, cfg.to_dict())


# Fields that define a run's trajectory: resuming with any of them changed is refused by default.
# The global batch (micro x accum x world) is compared by the trainer: 2 x 4 on one process equals 2 x 2 on two.
TRAJECTORY_FIELDS = ("model", "train.seq_len", "train.seed", "optim.name",
                     "data.datasets", "data.stages", "data.tokenizer", "data.train_tokenizer_vocab_size",
                     "data.val_fraction")


def _dataset_defaults(datasets: Any) -> Any:
    """Saved datasets with every DatasetConfig field present (defaults for the ones the save lacks)."""
    if not isinstance(datasets, list):
        return datasets
    base = dataclasses.asdict(DatasetConfig())
    return [{**base, **d} if isinstance(d, dict) else d for d in datasets]


def trajectory_diff(old: dict, new: dict) -> list[str]:
    """Trajectory-defining fields whose values differ between two resolved config dicts."""
    diffs = []
    for key in TRAJECTORY_FIELDS:
        a = get_dotted(old, key, {})
        b = get_dotted(new, key, {})
        if key == "data.datasets":  # a config saved before a dataset field existed had its default
            a = _dataset_defaults(a)
            b = _dataset_defaults(b)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs
