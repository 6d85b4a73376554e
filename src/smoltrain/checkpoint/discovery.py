"""How a run's checkpoints are named and found: RUN/checkpoints/step_NNNNNNNN, the newest that verifies,
and what a model path given to a command stands for (a checkpoint, a run's newest, an HF directory).

The one place that knows the step-name rule and walks a run's checkpoints. It imports only the core
modules and never torch, so the HF formats, evaluation and the CLI (which refuses a wrong path before
torch's import) may import it without reaching into the rest of the checkpoint package.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from pathlib import Path

from smoltrain.errors import UserError
from smoltrain.storage import MANIFEST, verify_manifest

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d{8})$")  # RUN/checkpoints/step_NNNNNNNN


def step_name(step: int) -> str:
    """The directory name of step N, on disk and on a store."""
    return f"step_{step:08d}"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_name(step)


def step_of(ckpt: str | Path) -> int:
    """The step a checkpoint directory is named for (step_dir's inverse)."""
    return int(Path(ckpt).name.removeprefix("step_"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories of a run, oldest first (staging debris is ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def newest_valid(run_dir: Path, quarantine_bad: bool = False) -> Path | None:
    """The newest checkpoint of a run that passes its manifest. Each newer one that fails is reported and
    skipped, or (`quarantine_bad`: a resume, under the run dir's lock) moved aside, never deleted."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_manifest(ckpt)
            return ckpt
        except UserError as e:
            if quarantine_bad:
                moved = quarantine(ckpt)
                warnings.warn(f"{e} Skipping it (moved to {moved.name}) and trying the previous one.", stacklevel=2)
            else:
                warnings.warn(f"Skipping checkpoint: {e}", stacklevel=2)
    return None


def quarantine(ckpt: Path) -> Path:
    """Rename a bad checkpoint out of discovery's sight (kept for inspection, never deleted)."""
    target = ckpt.parent / f".corrupt-{ckpt.name}-{uuid.uuid4().hex[:6]}"
    os.replace(ckpt, target)
    return target


def quarantined(run_dir: Path) -> list[Path]:
    """Checkpoints moved aside as corrupt by an earlier resume, oldest name first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.iterdir() if p.name.startswith(".corrupt-")) if root.is_dir() else []


def _model_kind(p: Path) -> str:
    """What `p` holds, from file names alone: "checkpoint", "run" or "hf"; anything else is refused."""
    if not p.exists():
        raise UserError(f"{p} does not exist.")
    if (p / MANIFEST).exists():
        return "checkpoint"
    if (p / CHECKPOINTS).is_dir():
        return "run"
    if p.is_dir() and (p / "config.json").exists():
        return "hf"
    raise UserError(f"{p} is not a smoltrain checkpoint, a run directory or a Hugging Face model directory.")


def _no_checkpoint(run_dir: Path) -> UserError:
    return UserError(f"Run directory {run_dir} has no valid checkpoint yet.")


def check_model_path(path: str | Path) -> Path:
    """What resolve_checkpoint refuses without reading the weights: a path that does not exist, a run dir
    without checkpoints, anything but a checkpoint, run or HF model directory. Commands that read a model
    call it before importing torch (seconds), so a mistyped path answers at once."""
    p = Path(path).expanduser()
    if _model_kind(p) == "run" and not list_checkpoints(p):
        raise _no_checkpoint(p)
    return p


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (verified against its manifest), a run dir (-> its newest valid checkpoint) or an
    HF model dir."""
    p = Path(path).expanduser()
    kind = _model_kind(p)
    if kind == "checkpoint":
        verify_manifest(p)
    if kind != "run":
        return p
    ckpt = newest_valid(p)
    if ckpt is None:
        raise _no_checkpoint(p)
    return ckpt
