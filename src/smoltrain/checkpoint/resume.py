"""Which checkpoint a run resumes from, and what the resumed segment changes (picked by rank 0, under the lock)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from smoltrain import distributed as dist_io
from smoltrain.checkpoint import state as ckpt_io
from smoltrain.checkpoint.discovery import (
    list_checkpoints,
    newest_valid,
    quarantined,
    resolve_checkpoint,
    step_of,
)
from smoltrain.checkpoint.rundir import settings_diff
from smoltrain.config import Config, DatasetConfig
from smoltrain.errors import UserError
from smoltrain.recipefile import get_dotted

if TYPE_CHECKING:
    from smoltrain.checkpoint.layout import LocalLayout


@dataclasses.dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from (None: start fresh), in this rank's run dir, and what changed."""

    path: Path | None = None
    changes: list[str] = dataclasses.field(default_factory=list)  # settings that differ from the checkpoint's config (diff and history)
    saved_max_steps: int | None = None  # the saved run's train.max_steps: a larger one extends it


def find_resume(cfg: Config, layout: LocalLayout, global_batch: int) -> Resume:
    """Every rank: the one way a run finds its checkpoint. Rank 0 picks it under the run dir's lock (the
    newest valid one, corrupt newer ones quarantined; the store's when the layout says so) and checks the
    config against it; then every rank gets it in its own run dir (`layout.fetch`).

    Trajectory changes (model, data, seed, global batch) are refused unless train.allow_config_change;
    other changes (lr, schedule, weight decay, ...) are accepted and returned for the diff and history.
    """
    picked = dist_io.on_main(lambda: _pick(cfg, layout, global_batch))
    return dataclasses.replace(picked, path=layout.fetch(picked.path))


def _pick(cfg: Config, layout: LocalLayout, global_batch: int) -> Resume:
    """Rank 0: the checkpoint to resume, checked against this config."""
    run_dir = layout.run_dir
    explicit = cfg.train.resume_from
    layout.check_resume_from(explicit)
    ckpt_io.clean_debris(run_dir)  # safe: this process holds the run dir's lock
    if explicit:
        if not Path(explicit).exists():
            raise UserError(f"train.resume_from {explicit} does not exist (refusing to start fresh).")
        found = resolve_checkpoint(explicit)
    else:
        found = layout.from_store(newest_resumable(run_dir, cfg.train.start_fresh))
    if found is None:
        return Resume()
    layout.share(found)
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
    saved_max = (old.get("train") or {}).get("max_steps", step)
    return Resume(found, settings_diff(old, cfg.to_dict()), saved_max)


def newest_resumable(run_dir: Path, start_fresh: bool) -> Path | None:
    """find_resume's look at the run dir: its newest valid checkpoint, corrupt newer ones warned about and
    quarantined.

    If checkpoints exist (or were quarantined by an earlier run) but none is valid, refuse unless
    `start_fresh`: training from step 0 silently would rewind the run's logs over them.
    """
    found = newest_valid(run_dir, quarantine_bad=True)
    if found is not None:
        return found
    bad = quarantined(run_dir)
    if bad and not start_fresh:
        names = ", ".join(p.name for p in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"Every checkpoint in {run_dir}/checkpoints is corrupt (moved aside as {names}); "
                        "refusing to start fresh over them, which would rewind metrics.jsonl. Inspect them, then "
                        "move them out of that directory, or set train.start_fresh=true to train from step 0 in "
                        "this run dir (they are kept), or use another run.dir.")
    return None


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
