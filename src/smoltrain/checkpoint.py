"""Checkpoint directories: atomic commit, sha256 manifest, discovery, and loading a model from one.

A checkpoint directory is also a Hugging Face model directory (config.json + model.safetensors with HF
names + tokenizer files); training checkpoints add the trainer's state beside it. It is staged under a
hidden name, fsynced, given a manifest with the sha256 of every file, and only then renamed into place:
a directory with the final name is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smoltrain.config import ModelConfig
from smoltrain.errors import UserError
from smoltrain.model import SmolLM2
from smoltrain.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, info: dict | None = None) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": "smoltrain-checkpoint", "version": 1, **(info or {}),
                "files": {str(p.relative_to(directory)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                          for p in files}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for p in [*files, directory / MANIFEST]:
        _fsync(p)


def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"Checkpoint {directory} has a missing or unreadable {MANIFEST} ({e}).") from None


def verify_checkpoint(directory: Path) -> dict:
    """The manifest, after checking every file it lists exists with the recorded size and sha256."""
    manifest = read_manifest(directory)
    for name, rec in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"Checkpoint {directory} is incomplete: {name} is missing.")
        if path.stat().st_size != rec["size"] or sha256_file(path) != rec["sha256"]:
            raise UserError(f"Checkpoint {directory} is corrupted: {name} does not match its sha256 in {MANIFEST}.")
    return manifest


@contextlib.contextmanager
def staged_dir(final: Path, info: dict | None = None, replace: bool = False) -> Iterator[Path]:
    """Yield a hidden staging directory beside `final`; on success write the manifest, fsync, rename.

    On an exception the staging directory is removed and `final` is untouched. With `replace`, an
    existing `final` is swapped out only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        commit_staged(staging, final, info, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit_staged(staging: Path, final: Path, info: dict | None = None, replace: bool = False) -> None:
    """Manifest + fsync the staging dir, then rename it to `final` (the commit point)."""
    write_manifest(staging, info)
    old = None
    if final.exists():
        if not replace:
            raise UserError(f"{final} already exists (pass --force to replace it).")
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staging, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_state(model: SmolLM2) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights with HF names, the tied head dropped (as HF saves it)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model_files(directory: Path, state: dict[str, torch.Tensor], cfg: ModelConfig,
                     tokenizer: Tokenizer | None) -> None:
    """config.json + model.safetensors (+ tokenizer files): what transformers needs to load the model."""
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save(directory)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories of a run, oldest first (staging debris is ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def newest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes its manifest; corrupt newer ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except UserError as e:
            warnings.warn(f"Skipping checkpoint: {e}", stacklevel=2)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a run dir (-> its newest valid checkpoint) or an HF model dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist.")
    if (p / MANIFEST).exists():
        verify_checkpoint(p)
        return p
    if (p / "checkpoints").is_dir():
        ckpt = newest_valid(p)
        if ckpt is None:
            raise UserError(f"Run directory {p} has no valid checkpoint yet.")
        return ckpt
    if p.is_dir() and (p / "config.json").exists():
        return p
    raise UserError(f"{p} is not a smoltrain checkpoint, a run directory or a Hugging Face model directory.")


def read_hf_config(directory: Path) -> ModelConfig:
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory}/config.json is missing or not valid JSON ({e}).") from None
    return ModelConfig.from_hf(hf, source=f"{directory}/config.json")


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory: model.safetensors, a sharded safetensors index, or pytorch_model*.bin."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{directory} has no model weights (model.safetensors or pytorch_model.bin).")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                   weights_only=True)
        except Exception as e:
            raise UserError(f"Could not read weights file {f}: {e}") from None
        state.update(part)
    return state


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SmolLM2:
    """Build the model on meta and assign `state` into it, with errors that name what does not fit."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = SmolLM2(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" * bool(missing), f"unexpected {unexpected[:4]}" * bool(unexpected),
                 f"wrong shapes {wrong[:4]}" * bool(wrong)]
        raise UserError(f"Weights in {source} do not fit the model its config describes: "
                        + "; ".join(p for p in parts if p) + ".")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False,
                          assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               need_tokenizer: bool = True) -> tuple[SmolLM2, Tokenizer | None, Path]:
    """Model (+ tokenizer) from a checkpoint dir, run dir or HF dir; returns the directory used."""
    return load_resolved(resolve_checkpoint(path), device, dtype, need_tokenizer)


def load_resolved(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  need_tokenizer: bool = True) -> tuple[SmolLM2, Tokenizer | None, Path]:
    """load_model for a directory that resolve_checkpoint (or resume discovery) already verified:
    hashing a checkpoint twice costs seconds per GB."""
    cfg = read_hf_config(directory)
    model = model_from_state(cfg, read_hf_weights(directory), str(directory), device, dtype)
    tokenizer = None
    if need_tokenizer:
        if not (directory / "tokenizer.json").exists():
            raise UserError(f"{directory} holds no tokenizer.json; import it again with --tokenizer.")
        tokenizer = load_tokenizer(directory)
    return model.eval(), tokenizer, directory


# --- training checkpoints: RUN/checkpoints/step_NNNNNNNN ---------------------------------------------

TRAIN_STATE, OPTIMIZER_DIR, RNG, RUN_CONFIG = "train_state.json", "optimizer", "rng.pt", "config.yaml"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_for(final: Path) -> Path:
    """The one staging dir every rank of a distributed save writes into (rank 0 commits it)."""
    return final.parent / f".staging-{final.name}"


def begin_train_checkpoint(run_dir: Path, step: int) -> Path:
    """Rank 0, before a save: set aside a same-named (corrupt) checkpoint, make a fresh staging dir."""
    final = step_dir(run_dir, step)
    if final.exists():  # e.g. a corrupt one that resume skipped: set it aside, never delete it
        quarantine(final)
    staging = staging_for(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def save_optimizer(staging: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """All ranks: optimizer state through torch.distributed.checkpoint, keyed by parameter name.

    DCP reshards on load, so a checkpoint written by N processes (DDP, FSDP or one) resumes with M.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with warnings.catch_warnings():  # DCP warns without a process group; in one process that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(staging / OPTIMIZER_DIR))


def load_optimizer(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(ckpt / OPTIMIZER_DIR))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def finish_train_checkpoint(staging: Path, run_dir: Path, step: int, model_cfg: ModelConfig,
                            weights: dict[str, torch.Tensor], tokenizer: Tokenizer | None, config_yaml: str,
                            extra: dict, train_state: dict, export_hf: bool = False) -> Path:
    """Rank 0, after every rank wrote its shards: weights, config, RNG, loop state; then commit."""
    final = step_dir(run_dir, step)
    if model_cfg.tie_word_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    save_model_files(staging, weights, model_cfg, tokenizer)
    (staging / RUN_CONFIG).write_text(config_yaml)
    torch.save({"rng": rng_state(), **extra}, staging / RNG)
    (staging / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
    from smoltrain.runinfo import fault_point

    fault_point("in_save", step)  # crash tests: die with a half-written checkpoint
    if export_hf:
        from smoltrain.interop import write_hf_extras

        hf = staging / "hf"
        hf.mkdir()
        save_model_files(hf, weights, model_cfg, tokenizer)
        write_hf_extras(hf, model_cfg, final)
    commit_staged(staging, final, {"kind": "train", "step": step})
    return final


def load_train_state(ckpt: Path) -> dict:
    """Everything but weights and optimizer: train_state.json, RNG (+ scaler), the run config."""
    try:
        extra = torch.load(ckpt / RNG, map_location="cpu", weights_only=False)
        return {"train_state": json.loads((ckpt / TRAIN_STATE).read_text()), "rng": extra.pop("rng"),
                "extra": extra, "config_yaml": (ckpt / RUN_CONFIG).read_text()}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{ckpt} is not a training checkpoint that can be resumed ({e}).") from None


def check_free_space(run_dir: Path, num_params: int, export_hf: bool, min_free_gb: float) -> None:
    """Fail before a save (and before training) when the next checkpoint cannot fit on the disk.

    fp32 weights + AdamW's two moments (+ the HF copy) with 5% slack, plus the configured reserve.
    """
    from smoltrain.errors import TrainingError

    need = num_params * 4 * (3 + export_hf) * 1.05 + min_free_gb * 2**30
    free = shutil.disk_usage(run_dir if Path(run_dir).exists() else Path.cwd()).free
    if free < need:
        raise TrainingError(f"Not enough free disk in {run_dir} for the next checkpoint: "
                            f"{free / 2**30:.2f} GiB free, about {need / 2**30:.2f} GiB needed.")


def quarantine(ckpt: Path) -> Path:
    """Rename a bad checkpoint out of discovery's sight (kept for inspection, never deleted)."""
    target = ckpt.parent / f".corrupt-{ckpt.name}-{uuid.uuid4().hex[:6]}"
    os.replace(ckpt, target)
    return target


def retain(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (called after a commit)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = old.parent / f".deleting-{old.name}"
        os.replace(old, doomed)  # leaves discovery at once, even if the delete is interrupted
        shutil.rmtree(doomed, ignore_errors=True)


def clean_debris(run_dir: Path) -> None:
    """Remove staging and half-deleted directories left by a kill (never committed checkpoints)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".staging-", ".deleting-")):
                shutil.rmtree(p, ignore_errors=True)


def quarantined(run_dir: Path) -> list[Path]:
    """Checkpoints moved aside as corrupt by an earlier resume, oldest name first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if p.name.startswith(".corrupt-")) if root.is_dir() else []


def find_resume_checkpoint(run_dir: Path, start_fresh: bool = False) -> Path | None:
    """Newest valid checkpoint; corrupt newer ones are warned about and quarantined.

    If checkpoints exist (or were quarantined by an earlier run) but none is valid, refuse unless
    `start_fresh`: training from step 0 silently would rewind the run's logs over them.
    """
    found = list_checkpoints(run_dir)
    for ckpt in reversed(found):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except UserError as e:
            moved = quarantine(ckpt)
            warnings.warn(f"{e} Skipping it (moved to {moved.name}) and trying the previous one.", stacklevel=2)
    bad = quarantined(run_dir)
    if bad and not start_fresh:
        names = ", ".join(p.name for p in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"Every checkpoint in {run_dir}/checkpoints is corrupt (moved aside as {names}); "
                        "refusing to start fresh over them, which would rewind metrics.jsonl. Inspect them, then "
                        "move them out of that directory, or set train.start_fresh=true to train from step 0 in "
                        "this run dir (they are kept), or use another run.dir.")
    return None
