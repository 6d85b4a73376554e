"""Training checkpoints: RUN/checkpoints/step_NNNNNNNN, written, read back, retained.

A training checkpoint is an HF model directory (interop writes and reads that part) plus the trainer's
state beside it, as safetensors and JSON only (nothing is unpickled). It is published by storage.commit:
staged under a private name, fsynced, given a manifest with the sha256 of every file, and only then
renamed into place, so a directory with the final name is always complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from smoltrain import storage
from smoltrain.checkpoint.discovery import STEP_DIR, list_checkpoints, quarantine, step_dir, step_of
from smoltrain.data.tokenizer import Tokenizer
from smoltrain.errors import UserError
from smoltrain.faults import fault_point
from smoltrain.hf.interop import drop_tied_head, save_model_files, save_tensors, write_hf_extras
from smoltrain.model.config import ModelConfig

# Nothing in a checkpoint is unpickled: weights, optimizer moments and torch RNG states are safetensors,
# everything else (loop counters, loader position, scaler, Python/numpy RNG, param groups) is JSON.

TRAIN_STATE = "train_state.json"
RUN_CONFIG = "config.yaml"
EXTRA = "extra.json"
RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"
PICKLED = ("rng.pt", "optimizer/.metadata")  # what checkpoints of smoltrain <= 0.1 held


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(uint8 tensors for safetensors, JSON-able Python/numpy states) of every RNG the loop uses."""
    import random

    import numpy as np

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class RNGState:
    """Every RNG the loop uses (torch, CUDA, Python, numpy) as a Stateful: uint8 tensors for safetensors and
    JSON-able Python/numpy states."""

    def state_dict(self) -> dict:
        tensors, plain = rng_state()
        return {"tensors": tensors, "plain": plain}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state["tensors"], state["plain"])


def begin_train_checkpoint(run_dir: Path, step: int) -> Path:
    """Rank 0, before a save: set aside a same-named (corrupt) checkpoint, make a private staging dir.

    The staging name holds this process's PID and a random tag, so no other process (a second trainer,
    a debris cleanup) ever writes into or removes it; under torchrun rank 0 tells the others its name.
    """
    final = step_dir(run_dir, step)
    if final.exists():  # e.g. a corrupt one that resume skipped: set it aside, never delete it
        quarantine(final)
    return storage.make_staging(final)


@contextlib.contextmanager
def discard_on_error(staging: Path | None) -> Iterator[None]:
    """Remove a staging dir when its save fails (a full disk, an error); a commit has renamed it away."""
    try:
        yield
    except BaseException:
        if staging is not None:
            storage.drop_staging(staging)
        raise


def finish_train_checkpoint(staging: Path, run_dir: Path, step: int, model_cfg: ModelConfig,
                            weights: dict[str, torch.Tensor], tokenizer: Tokenizer | None, config_yaml: str,
                            extra: dict, train_state: dict, rng: dict, export_hf: bool = False) -> Path:
    """Rank 0, after every rank wrote its part: weights, config, RNG, loop state; then commit.

    The rename in commit() is the one point where the checkpoint becomes visible and complete.
    """
    final = step_dir(run_dir, step)
    weights = drop_tied_head(weights, model_cfg)
    save_model_files(staging, weights, model_cfg, tokenizer)
    (staging / RUN_CONFIG).write_text(config_yaml)
    save_tensors(rng["tensors"], staging / RNG_TENSORS)
    (staging / RNG_JSON).write_text(json.dumps(rng["plain"]))
    (staging / EXTRA).write_text(json.dumps(extra, indent=2))
    (staging / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
    fault_point("in_save", step)  # crash tests: die with a half-written checkpoint
    if export_hf:
        hf = staging / "hf"
        hf.mkdir()
        save_model_files(hf, weights, model_cfg, tokenizer)
        write_hf_extras(hf, model_cfg, final)
    return storage.commit(staging, final, "train", {"kind": "train", "step": step})


def load_train_state(ckpt: Path) -> dict:
    """Everything but weights and optimizer: loop state, RNG, scaler, the run config (no unpickling)."""
    if not (ckpt / RNG_TENSORS).exists() and any((ckpt / p).exists() for p in PICKLED):
        raise UserError(f"{ckpt} was written by an older smoltrain whose RNG and optimizer files are pickles, "
                        "which could run code when loaded; smoltrain no longer reads them. Its weights still "
                        "work for init_from, eval, export and generate; to continue training, start a new run.dir "
                        f"with train.init_from={ckpt}.")
    try:
        rng_tensors = load_file(str(ckpt / RNG_TENSORS))
        rng_plain = json.loads((ckpt / RNG_JSON).read_text())
        _check_rng(rng_tensors, rng_plain)
        state = {"train_state": json.loads((ckpt / TRAIN_STATE).read_text()),
                 "rng": {"tensors": rng_tensors, "plain": rng_plain},
                 "extra": json.loads((ckpt / EXTRA).read_text()), "config_yaml": (ckpt / RUN_CONFIG).read_text()}
        if not isinstance(state["extra"], dict) or not isinstance(yaml.safe_load(state["config_yaml"]), dict):
            raise ValueError("extra.json or config.yaml is not a mapping")
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise UserError(f"{ckpt} is not a training checkpoint that can be resumed: its trainer state is missing "
                        f"or unreadable ({type(e).__name__}: {str(e)[:200]}).") from None
    check_train_state(ckpt, state["train_state"])
    return state


COUNTERS = ("step", "tokens_seen")  # non-negative integers a resume sets the loop to


def check_train_state(ckpt: Path, ts: object) -> None:
    """The loop counters are what their checkpoint says they are: a step -5 (or one that differs from the
    directory's name) would train with a negative learning rate and set valid checkpoints aside."""
    def bad(why: str) -> UserError:
        return UserError(f"{ckpt} has an inconsistent {TRAIN_STATE}: {why}; it cannot be resumed. Resume from "
                         "another checkpoint (train.resume_from) or move this one out of the run dir.")

    if not isinstance(ts, dict):
        raise bad(f"it holds {type(ts).__name__}, not an object")
    for key in COUNTERS:
        value = ts.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"{key} is {storage.shown(value)}, not an integer >= 0")
    rewarm = ts.get("rewarm_from")
    if rewarm is not None and (not isinstance(rewarm, int) or isinstance(rewarm, bool) or not 0 <= rewarm <= ts["step"]):
        raise bad(f"rewarm_from is {storage.shown(rewarm)}, not a step between 0 and {ts['step']}")
    if not isinstance(ts.get("loader"), dict):
        raise bad("it has no loader position")
    if STEP_DIR.match(Path(ckpt).name) and step_of(ckpt) != ts["step"]:
        raise bad(f"its step {ts['step']} is not its directory's ({Path(ckpt).name})")


def check_finite(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer moments with NaN or Inf would make the first step non-finite on every rerun: name the
    problem and the way out (the previous checkpoint) instead of "lower optim.lr"."""
    for state in optimizer.state.values():
        for name, t in state.items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                older = [p.name for p in list_checkpoints(Path(ckpt).parent.parent) if p.name < Path(ckpt).name]
                way = (f"move it out of {Path(ckpt).parent} and run the same command again: it resumes from the "
                       f"previous checkpoint, {older[-1]}" if older else "start a new run.dir (no older checkpoint is left)")
                raise UserError(f"The optimizer state in {ckpt} holds NaN or Inf values (in {name!r}); training "
                                f"from it would fail at its first step. The checkpoint is damaged: {way}.")


def _check_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Shapes and types an RNG accepts, checked before training starts rather than at set_rng_state."""
    if tensors["torch"].dtype != torch.uint8 or tensors["torch"].numel() != torch.get_rng_state().numel():
        raise ValueError(f"torch RNG state has {tensors['torch'].numel()} {tensors['torch'].dtype} values")
    version, internal, _ = plain["python"]
    if len(internal) != 625 or not all(isinstance(x, int) for x in internal):
        raise ValueError("Python RNG state is not 625 integers")
    if len(plain["numpy"][1]) != 624:
        raise ValueError("numpy RNG state is not 624 integers")


def checkpoint_bytes(shapes: dict[str, int], export_hf: bool, tokenizer_bytes: int) -> int:
    """Bytes of a training checkpoint before it is written, from {parameter name: numel}: fp32 weights
    (+ the HF copy), AdamW's two moments and step counters, the safetensors headers and optimizer.json
    (which repeat every name), the tokenizer files (+ the copy), RNG and the small JSON files.

    Calibrated on written checkpoints (tests: within 2%); after the first save the measured size is used.
    """
    num_params = sum(shapes.values())
    num_tensors = len(shapes)
    name_chars = sum(map(len, shapes))
    weights = num_params * 4 + name_chars + 66 * num_tensors + 8
    moments = 2 * num_params * 4 + 4 * num_tensors + 3 * name_chars + 216 * num_tensors + 8
    optimizer_json = 5 * name_chars + 200 * num_tensors + 700
    small = 24 * 1024 + 2600  # rng.json + rng.safetensors (~20 KiB), config.yaml, train_state, config, manifest
    hf = weights + tokenizer_bytes + 3 * 1024 if export_hf else 0  # + config, generation config, card
    return weights + moments + optimizer_json + tokenizer_bytes + small + hf


def check_free_space(run_dir: Path, need_bytes: int, min_free_gb: float) -> None:
    """Fail before a save (and before training) when the next checkpoint cannot fit on the disk."""
    from smoltrain.errors import TrainingError

    need = need_bytes + min_free_gb * 2**30
    free = shutil.disk_usage(run_dir if Path(run_dir).exists() else Path.cwd()).free
    if free < need:
        fmt = storage.format_bytes
        raise TrainingError(f"Not enough free disk in {run_dir} for the next checkpoint: {fmt(free)} free, about "
                            f"{fmt(need)} needed ({fmt(need_bytes)} for the checkpoint + checkpoint.min_free_gb "
                            f"{min_free_gb:g} GiB kept free). Free some space or lower checkpoint.keep_last.")


def retain(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (called after a commit)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        storage.remove_dir(old)  # renamed first: leaves discovery at once, even if the delete is interrupted


def clean_debris(run_dir: Path) -> list[Path]:
    """Remove the staging and half-deleted dirs of dead processes (never a live one's, never a checkpoint).

    The trainer calls this only while it holds the run-dir lock.
    """
    return storage.clean_stale(Path(run_dir) / "checkpoints")
