"""Which checkpoint a run resumes from, and what the resumed segment changes (rank 0, under the lock)."""

from __future__ import annotations

from pathlib import Path

import yaml

from smoltrain import checkpoint as ckpt_io
from smoltrain.config import Config, trajectory_diff
from smoltrain.errors import UserError
from smoltrain.rundir import settings_diff


def pick_resume(cfg: Config, run_dir: Path, global_batch: int, mirror=None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume (None: start fresh) and the settings that differ from its config.

    With no local checkpoint, `mirror` (checkpoint.remote) may download the newest remote one.

    Trajectory changes (model, data, seed, global batch) are refused unless train.allow_config_change;
    other changes (lr, schedule, weight decay, ...) are accepted and returned for the diff and history.
    """
    explicit = cfg.train.resume_from
    ckpt_io.clean_debris(run_dir)  # safe: this process holds the run dir's lock
    if explicit:
        if not Path(explicit).exists():
            raise UserError(f"train.resume_from {explicit} does not exist (refusing to start fresh).")
        found = ckpt_io.resolve_checkpoint(explicit)
    else:
        found = ckpt_io.find_resume_checkpoint(run_dir, cfg.train.start_fresh)
        if found is None and mirror is not None:  # a fresh machine: the remote copy, if any
            found = mirror.restore(run_dir)
    if found is None:
        return None, []
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
    newer = [p.name for p in ckpt_io.list_checkpoints(run_dir) if int(p.name[5:]) > step]
    if explicit and newer:  # saving over them would set valid checkpoints aside
        raise UserError(f"run.dir {run_dir} already holds checkpoints after step {step} ({', '.join(newer)}); "
                        "resuming there from train.resume_from would overwrite them. Use another run.dir.")
    return found, settings_diff(old, cfg.to_dict())
