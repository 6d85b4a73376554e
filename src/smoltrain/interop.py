"""Weights in and out: HF directories and GGUF files -> smoltrain checkpoints -> HF directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from smoltrain.checkpoint import (
    WEIGHTS,
    load_resolved,
    model_from_state,
    model_state,
    read_hf_config,
    read_hf_weights,
    resolve_checkpoint,
    save_model_files,
)
from smoltrain.config import ModelConfig, eos_ids
from smoltrain.errors import UserError
from smoltrain.modelcard import ORIGIN, model_card, model_kind
from smoltrain.storage import check_target, publish
from smoltrain.tokenizer import Tokenizer, load_tokenizer

# GGUF (llama.cpp) tensor names -> HF Llama names; "{i}" is the layer index.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key, i = ".".join(["blk", "{i}", *parts[2:]]), parts[1]
        return GGUF_NAMES[key].format(i=i) if key in GGUF_NAMES else None
    return GGUF_NAMES.get(gguf_name)


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it stores RoPE pairs interleaved; HF uses rotate-half)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_REQUIRED = ("llama.attention.head_count", "llama.embedding_length", "llama.feed_forward_length",
                 "llama.block_count")


def _gguf_config(fields: dict, tensor_names: list[str], path: Path) -> ModelConfig:
    def get(key, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path} holds a {arch!r} model; smoltrain imports Llama/SmolLM2 GGUF files only.")
    missing = [k for k in GGUF_REQUIRED if get(k) is None]
    if get("llama.vocab_size") is None and "tokenizer.ggml.tokens" not in fields:
        missing.append("llama.vocab_size (or tokenizer.ggml.tokens)")
    if missing:
        raise UserError(f"{path} lacks the GGUF fields {', '.join(missing)}, so it does not describe a model.")
    heads = int(get("llama.attention.head_count"))
    vocab = get("llama.vocab_size")
    cfg = ModelConfig(
        vocab_size=int(vocab if vocab is not None else len(fields["tokenizer.ggml.tokens"].data)),
        hidden_size=int(get("llama.embedding_length")), intermediate_size=int(get("llama.feed_forward_length")),
        num_hidden_layers=int(get("llama.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("llama.attention.head_count_kv", heads)),
        max_position_embeddings=int(get("llama.context_length", 2048)),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_id=get("tokenizer.ggml.eos_token_id"),
    )
    problems = cfg.validate()
    if problems:
        raise UserError(f"{path} has an invalid Llama shape: " + "; ".join(problems) + ".")
    return cfg


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and fp32 (dequantised) HF-named tensors of a llama GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({e}).") from None
    cfg = _gguf_config(dict(reader.fields), [t.name for t in reader.tensors], path)
    state = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))  # GGUF lists dims innermost-first
        if name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg.num_key_value_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return cfg, state


def import_model(src: str | Path, out: str | Path, tokenizer: str | None = None, force: bool = False) -> Path:
    """Write a smoltrain checkpoint from an HF directory or a .gguf file (weights in fp32)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise UserError(f"Import source {src} does not exist.")
    check_target(out, "import", force, inputs=[src, *([tokenizer] if tokenizer else [])])
    if src.is_file() and src.suffix == ".gguf":
        cfg, state = read_gguf(src)
        tok = load_tokenizer(tokenizer or src)
        origin = gguf_origin(src)
    elif src.is_dir():
        cfg, state = read_hf_config(src), read_hf_weights(src)
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


def gguf_origin(path: Path) -> dict:
    """Where a GGUF came from, from its general.* metadata: name, organisation, base or instruct."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields

    def get(key: str) -> str | None:
        f = fields.get(key)
        return str(f.contents()) if f is not None else None

    stem = path.name.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct
    org = get("general.organization")
    name = f"{org}/{stem}" if org else stem
    names = [stem, get("general.name"), get("general.finetune")]
    kind = model_kind(names, get("tokenizer.chat_template") is not None)
    return {"source": str(path), "name": name, "kind": kind, "license": get("general.license")}


def hf_origin(directory: Path) -> dict:
    """Where an HF directory came from: its config's _name_or_path (or the folder) and its chat template."""
    try:
        hf = json.loads((directory / "config.json").read_text())
        tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        hf, tok_cfg = {}, {}
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
    model, tok, _ = load_resolved(src)  # resolve_checkpoint above verified the manifest
    with publish(out, "export", {"kind": "export", "source": str(src)}, replace=force) as d:
        save_model_files(d, model_state(model), model.config, tok)
        write_hf_extras(d, model.config, src, card)
    return out


def write_hf_extras(d: Path, cfg: ModelConfig, src: Path, card: str | None = None) -> None:
    """generation_config.json and the model card beside the weights of an HF folder."""
    (d / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2))
    (d / "README.md").write_text(card or model_card(cfg, src, d))


__all__ = ["WEIGHTS", "export_hf", "import_model", "read_gguf"]
