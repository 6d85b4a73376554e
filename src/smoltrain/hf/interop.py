"""Weights in and out: HF directories and GGUF files <-> model state <-> HF directories and GGUF files.

A smoltrain checkpoint is also an HF model directory (config.json + model.safetensors with HF names +
tokenizer files), so one reader serves checkpoints, run dirs (their newest valid checkpoint), imported
models and HF downloads. Nothing here knows about training state: checkpoint.py adds that beside it.
The GGUF format itself (names, permutation, quantisation, tokenizer metadata) lives in hf/gguf.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from smoltrain import storage
from smoltrain.checkpoint.discovery import STEP_DIR, resolve_checkpoint
from smoltrain.data.tokenizer import Tokenizer, load_tokenizer
from smoltrain.errors import UserError
from smoltrain.hf.gguf import DTYPES, gguf_origin, gguf_problems, is_our_export, read_gguf, write_gguf
from smoltrain.hf.modelcard import ORIGIN, card_title, model_card, model_kind, read_origin
from smoltrain.model.config import ModelConfig, eos_ids
from smoltrain.model.llama import SmolLM2
from smoltrain.storage import check_file_target, check_target, publish, staged_file

WEIGHTS = "model.safetensors"
TIED_HEAD = "lm_head.weight"  # with tie_word_embeddings it is the embedding: HF stores only that
T = TypeVar("T")


def drop_tied_head(state: dict[str, T], cfg: ModelConfig) -> dict[str, T]:
    """`state` without lm_head.weight when the head is tied (as HF saves it, and as a fitting state lacks it)."""
    if not cfg.tie_word_embeddings:
        return state
    return {k: v for k, v in state.items() if k != TIED_HEAD}


def model_state(model: SmolLM2) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights with HF names, the tied head dropped (as HF saves it)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return drop_tied_head(state, model.config)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a full disk reported as the OSError it is, and the file's mode what
    open() would give (safetensors writes 0600: an exported model must be as readable as its config)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:
        if storage.is_no_space(e):
            raise OSError(28, f"No space left on device: {path}") from None
        raise
    os.chmod(path, 0o666 & ~storage.umask())


def save_model_files(directory: Path, state: dict[str, torch.Tensor], cfg: ModelConfig,
                     tokenizer: Tokenizer | None) -> None:
    """config.json + model.safetensors (+ tokenizer files): what transformers needs to load the model."""
    save_tensors(state, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    if tokenizer is not None:
        tokenizer.save(directory)


def hf_config(directory: Path) -> dict:
    """An HF directory's config.json as a dict; a missing, malformed or non-object file is a UserError."""
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory}/config.json is missing or not valid JSON ({e}).") from None
    if not isinstance(hf, dict):
        raise UserError(f"{directory}/config.json must hold a JSON object, not {type(hf).__name__}.")
    return hf


def read_hf_config(directory: Path) -> ModelConfig:
    """The ModelConfig of an HF directory's config.json (anything but plain Llama is refused)."""
    return ModelConfig.from_hf(hf_config(directory), source=f"{directory}/config.json")


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory: model.safetensors, its shards, or pytorch_model*.bin (read with
    weights_only=True: plain tensors only, nothing in the file is executed)."""
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{directory} has no model weights (model.safetensors or pytorch_model.bin).")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                part = load_file(str(f))
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"Could not read weights file {f}: {e}") from None
        state.update(part)
    return state


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SmolLM2:
    """Build the model on meta and assign `state` into it, with errors that name what does not fit."""
    state = drop_tied_head({k.removeprefix("_orig_mod."): v for k, v in state.items()}, cfg)
    with torch.device("meta"):
        model = SmolLM2(cfg)
    expected = drop_tied_head({k: v.shape for k, v in model.state_dict().items()}, cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if k in state and state[k].shape != s]
    parts = []
    if missing:
        parts.append(f"missing {missing[:4]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:4]}")
    if wrong:
        parts.append(f"wrong shapes {wrong[:4]}")
    if parts:
        raise UserError(f"Weights in {source} do not fit the model its config describes: {'; '.join(parts)}.")
    # copy=True: tensors read from a safetensors file sit at the file's offsets (8-byte aligned), and on
    # some CPUs (AMD EPYC) BLAS rounds differently on such buffers than on the 64-byte-aligned ones a
    # fresh run allocates: a resumed run then evaluated 1 ulp away from an uninterrupted one
    model.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()},
                          strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               need_tokenizer: bool = True) -> tuple[SmolLM2, Tokenizer | None, Path]:
    """Model (+ tokenizer) from a checkpoint dir, run dir or HF dir; returns the directory used."""
    return load_retrying(path, resolve_checkpoint(path), device, dtype, need_tokenizer)


LOAD_TRIES = 3


def load_retrying(path: str | Path, directory: Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, need_tokenizer: bool = True
                  ) -> tuple[SmolLM2, Tokenizer | None, Path]:
    """load_resolved(directory); when `path` is a run dir still training, its retention may delete that
    checkpoint while it is read (export RUN during training): then the newest one is resolved and read again."""
    for _ in range(LOAD_TRIES - 1):
        try:
            return load_resolved(directory, device, dtype, need_tokenizer)
        except (UserError, OSError):
            if directory.exists() or directory == Path(path).expanduser():
                raise
        directory = resolve_checkpoint(path)  # retention removed it meanwhile: the run's newest one now
    return load_resolved(directory, device, dtype, need_tokenizer)


def load_causal_lm(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Tokenizer, Path]:
    """(model in eval mode, tokenizer, directory) of a checkpoint, run dir or any HF causal LM directory:
    ours for Llama (a SmolLM2), transformers' AutoModelForCausalLM for anything else."""
    directory = resolve_checkpoint(path)
    if hf_config(directory).get("model_type") == "llama":
        return load_retrying(path, directory, device=device)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar is noise inside our command
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except Exception as e:
        raise UserError(f"transformers could not load {directory}: {e}") from None
    return model.to(device).eval(), load_tokenizer(directory), directory


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


def import_model(src: str | Path, out: str | Path, tokenizer: str | None = None, force: bool = False) -> Path:
    """Write a smoltrain checkpoint from an HF directory or a .gguf file (weights in fp32)."""
    src = Path(src).expanduser()
    out = Path(out).expanduser()
    if not src.exists():
        raise UserError(f"Import source {src} does not exist.")
    check_target(out, "import", force, inputs=[src, *([tokenizer] if tokenizer else [])])
    if src.is_file() and src.suffix == ".gguf":
        cfg, state = read_gguf(src)
        tok = load_tokenizer(tokenizer or src)
        origin = gguf_origin(src)
    elif src.is_dir():
        cfg = read_hf_config(src)
        state = read_hf_weights(src)
        tok = load_tokenizer(tokenizer or src)
        origin = hf_origin(src)
    else:
        raise UserError(f"Import source {src} is neither an HF model directory nor a .gguf file.")
    _check_tokenizer(tok, cfg, src)
    model = model_from_state(cfg, state, str(src))  # validates names and shapes
    with publish(out, "import", {"kind": "import", "source": str(src)}, replace=force) as d:
        save_model_files(d, model_state(model), cfg, tok)
        (d / ORIGIN).write_text(json.dumps(origin, indent=2))
    return out


def hf_origin(directory: Path) -> dict:
    """Where an HF directory came from: its config's _name_or_path (or the folder) and its chat template."""
    try:
        hf = json.loads((directory / "config.json").read_text())
        tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        hf = {}
        tok_cfg = {}
    name = hf.get("_name_or_path") or directory.resolve().name
    kind = model_kind([name, directory.resolve().name], bool(tok_cfg.get("chat_template")))
    return {"source": str(directory), "name": name, "kind": kind}


def _check_tokenizer(tok: Tokenizer, cfg: ModelConfig, src: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"The tokenizer for {src} has {tok.vocab_size} tokens but the model only "
                        f"{cfg.vocab_size} embeddings.")


def generation_config(cfg: ModelConfig) -> dict:
    ids = eos_ids(cfg)
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": ids[0] if len(ids) == 1 else ids}


def export_hf(ckpt: str | Path, out: str | Path, force: bool = False, card: str | None = None) -> Path:
    """An HF directory (safetensors, config.json, generation_config.json, tokenizer, README.md) that
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline."""
    src = resolve_checkpoint(ckpt)
    out = Path(out).expanduser()
    check_target(out, "export", force, inputs=[ckpt, src])  # never over the run dir or the checkpoint
    model, tok, src = load_retrying(ckpt, src)  # resolve_checkpoint above verified the manifest
    with publish(out, "export", {"kind": "export", "source": str(src)}, replace=force) as d:
        save_model_files(d, model_state(model), model.config, tok)
        write_hf_extras(d, model.config, src, card)
    return out


def write_hf_extras(d: Path, cfg: ModelConfig, src: Path, card: str | None = None) -> None:
    """generation_config.json and the model card beside the weights of an HF folder."""
    (d / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2))
    (d / "README.md").write_text(card or model_card(cfg, src, d))


def export_gguf(ckpt: str | Path, out: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """One llama GGUF file (llama.cpp, Ollama, LM Studio) of a checkpoint, in `dtype` (f32, f16, bf16, q8_0).

    Refused before any work: an unknown dtype, an --out inside the checkpoint or its run dir, an existing
    file we did not write (or did, without --force), a model or tokenizer GGUF cannot express. The file
    is written under a private staging name beside --out, fsynced and renamed into place."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one GGUF export writes; choose one of {', '.join(DTYPES)}.")
    src = resolve_checkpoint(ckpt)
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"--out {out} should name a .gguf file (llama.cpp, Ollama and LM Studio look for it).")
    check_file_target(out, "export", force, inside=[ckpt, src, *_run_dir(src)], ours=is_our_export)
    model, tok, _ = load_resolved(src)
    problems = gguf_problems(model.config, tok)
    if problems:
        raise UserError(f"GGUF cannot express this checkpoint ({src}): {'; '.join(problems)}. Nothing was written.")
    storage.clean_stale(out.parent, out.name)
    origin = read_origin(src) or {}
    meta = {"name": card_title(src), "license": origin.get("license"), "version": _version()}
    with staged_file(out, replace=force, ours=is_our_export) as staging:
        write_gguf(staging, model_state(model), model.config, tok, dtype, meta)
    return out


def _run_dir(ckpt: Path) -> list[Path]:
    """The run dir a checkpoint lives in (RUN/checkpoints/step_N), if it does."""
    return [ckpt.parent.parent] if ckpt.parent.name == "checkpoints" and STEP_DIR.match(ckpt.name) else []


def _version() -> str:
    from smoltrain import __version__

    return __version__
