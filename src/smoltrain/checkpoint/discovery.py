"""How a run's checkpoints are named and found: RUN/checkpoints/step_NNNNNNNN, the newest that verifies.

The one place that knows the step-name rule and walks a run's checkpoints. It imports only the core
modules, so the HF formats (interop resolves a run dir to its newest valid checkpoint) may import it
without reaching into the rest of the checkpoint package.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from pathlib import Path

from smoltrain.errors import UserError
from smoltrain.storage import verify_manifest

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
