"""GGUF files (llama.cpp, Ollama, LM Studio) <-> model state, with the `gguf` package: llama.cpp's own
Python reader and writer, so the layout, the quantisation and the metadata keys are llama.cpp's.

Reading dequantises a llama GGUF to fp32 HF-named tensors. Writing does what llama.cpp's
convert_hf_to_gguf.py does for a Llama: q/k rows permuted to llama.cpp's interleaved RoPE pairs, norms
kept in f32, no output.weight when the head is tied (llama.cpp then uses token_embd), the byte-level BPE
vocabulary with its merges, token types, special ids and chat template. Nothing here knows checkpoints
or files' lifetimes: interop resolves the checkpoint and publishes the file.

`gguf` is imported inside the functions: it costs ~0.1 s, and most commands never touch a GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from smoltrain.data.tokenizer import Tokenizer
from smoltrain.errors import UserError
from smoltrain.hf.modelcard import model_kind
from smoltrain.model.config import ModelConfig, eos_ids

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
HF_NAMES = {hf.replace(".{i}.", ".").replace("{i}", ""): g for g, hf in GGUF_NAMES.items()}

# --dtype -> (the type of 2-D weights, general.file_type); gguf's GGMLQuantizationType / LlamaFileType names
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
EXPORT_KEY = "smoltrain.export"  # our own key (llama.cpp ignores unknown keys): marks a file we wrote
GGUF_REQUIRED = ("llama.attention.head_count", "llama.embedding_length", "llama.feed_forward_length",
                 "llama.block_count")


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        return GGUF_NAMES[key].format(i=parts[1]) if key in GGUF_NAMES else None
    return GGUF_NAMES.get(gguf_name)


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of an HF Llama tensor (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return HF_NAMES["model.layers." + ".".join(parts[3:])].replace("{i}", parts[2])
    return HF_NAMES[hf_name]


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it stores RoPE pairs interleaved; HF uses rotate-half)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py's LlamaModel.permute): _unpermute's inverse."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32_value(value) -> float:
    """A float GGUF stored as float32, back as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


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
        rope_theta=_f32_value(get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=_f32_value(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
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


def read_fields(path: Path) -> dict | None:
    """The metadata of a GGUF file as plain values (arrays left out), or None when it is not one."""
    import gguf

    try:
        fields = gguf.GGUFReader(str(path)).fields
    except Exception:
        return None
    return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}


def gguf_origin(path: Path) -> dict:
    """Where a GGUF came from, from its general.* metadata: name, organisation, base or instruct."""
    fields = read_fields(path) or {}

    def get(key: str) -> str | None:
        value = fields.get(key)
        return None if value is None else str(value)

    stem = path.name.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct
    org = get("general.organization")
    name = f"{org}/{stem}" if org else stem
    names = [stem, get("general.name"), get("general.finetune")]
    kind = model_kind(names, get("tokenizer.chat_template") is not None)
    return {"source": str(path), "name": name, "kind": kind, "license": get("general.license")}


def is_our_export(path: Path) -> bool:
    """The file is a GGUF that `smoltrain export --format gguf` wrote (it carries our marker key)."""
    fields = read_fields(path) if path.is_file() else None
    return fields is not None and EXPORT_KEY in fields


def _byte_level(step) -> bool:
    return (isinstance(step, dict) and step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and step.get("use_regex", True))


def pre_tokenizer_name(pre) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre_tokenizer, None when it has none.

    GPT-2's byte-level split is "gpt-2"; digits split one by one before it (SmolLM2's cosmo2, and what
    `smoltrain tokenizer train` writes) is "smollm": llama.cpp runs the same two regexes."""
    if _byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and \
            _byte_level(steps[1]):
        return "smollm"
    return None


def _tokenizer_problems(doc: dict) -> list[str]:
    model = doc.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"tokenizer.json model.type {model.get('type')!r} (GGUF's gpt2 tokenizer is a BPE)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "ignore_merges"):
        if model.get(key):
            problems.append(f"tokenizer.json model.{key}={model[key]!r}")
    if doc.get("normalizer") is not None:
        problems.append(f"tokenizer.json normalizer {doc['normalizer'].get('type')!r}")
    if pre_tokenizer_name(doc.get("pre_tokenizer")) is None:
        problems.append(f"tokenizer.json pre_tokenizer {json.dumps(doc.get('pre_tokenizer'))} (llama.cpp splits "
                        "byte-level text the GPT-2 way, optionally digits first)")
    if (doc.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append(f"tokenizer.json decoder {json.dumps(doc.get('decoder'))} (a byte-level one is needed)")
    return problems


def gguf_problems(cfg: ModelConfig, tok: Tokenizer) -> list[str]:
    """What of this model and tokenizer a llama GGUF cannot express, each naming its field (empty if none)."""
    problems = []
    if len(eos_ids(cfg)) > 1:
        problems.append(f"model.eos_token_id {cfg.eos_token_id} (GGUF holds one tokenizer.ggml.eos_token_id)")
    if tok.vocab_size > cfg.vocab_size:
        problems.append(f"the tokenizer's {tok.vocab_size} tokens against model.vocab_size {cfg.vocab_size}")
    return problems + _tokenizer_problems(json.loads((tok.directory / "tokenizer.json").read_text()))


def _vocab(tok: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for every embedding row, as convert_hf_to_gguf.py lists them: special added
    tokens are CONTROL, other added ones USER_DEFINED, rows no token uses `[PAD{i}]` (UNUSED)."""
    from gguf import TokenType

    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    added = tok.backend.get_added_tokens_decoder()
    tokens = []
    types = []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return tokens, types


def _add_tokenizer(w, tok: Tokenizer, cfg: ModelConfig) -> None:
    """The vocabulary, merges, special ids and chat template (gguf's SpecialVocab reads the tokenizer files).

    The model's own bos/eos ids win over the tokenizer's (generation stops where ours does), and no BOS
    or EOS is added to prompts: smoltrain encodes text without special tokens."""
    from gguf import SpecialVocab

    doc = json.loads((tok.directory / "tokenizer.json").read_text())
    tokens, types = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(doc["pre_tokenizer"]))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = SpecialVocab(tok.directory, load_merges=True, n_vocab=cfg.vocab_size)
    for kind, tid in (("bos", cfg.bos_token_id), ("eos", eos_ids(cfg)[0] if eos_ids(cfg) else None)):
        if tid is not None:
            special.special_token_ids[kind] = tid
    special.add_special_token = {"bos": False, "eos": False}
    special.add_to_gguf(w, quiet=True)


def _add_architecture(w, cfg: ModelConfig, meta: dict, file_type: int) -> None:
    import gguf

    org, _, name = str(meta.get("name") or "model").rpartition("/")
    w.add_type("model")
    w.add_name(name)
    if org:
        w.add_organization(org)
    if meta.get("license"):
        w.add_license(meta["license"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor(name: str, t: torch.Tensor, cfg: ModelConfig, qtype) -> tuple[np.ndarray, object]:
    """One HF tensor as llama.cpp stores it: q/k permuted, norms in f32, a row that does not fill q8_0's
    32-value blocks in f16 (convert_hf_to_gguf.py's fallback too)."""
    import gguf

    w = t.detach().to(torch.float32).cpu().numpy()
    if name.endswith("q_proj.weight"):
        w = _permute(w, cfg.num_attention_heads)
    elif name.endswith("k_proj.weight"):
        w = _permute(w, cfg.num_key_value_heads)
    kind = gguf.GGMLQuantizationType.F32 if w.ndim == 1 else qtype
    try:
        return gguf.quants.quantize(np.ascontiguousarray(w), kind), kind
    except gguf.QuantError:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_gguf(path: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, tok: Tokenizer, dtype: str,
               meta: dict) -> None:
    """Write `state` (HF names, the tied head dropped) as a llama GGUF at `path` in `dtype` (a DTYPES key).

    `meta` gives general.name (org/name) and general.license; the file carries EXPORT_KEY so a later
    `--force` knows it may replace it."""
    import gguf

    qtype_name, file_type = DTYPES[dtype]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), "llama")
    try:
        _add_architecture(w, cfg, meta, int(gguf.LlamaFileType[file_type]))
        _add_tokenizer(w, tok, cfg)
        w.add_string(EXPORT_KEY, json.dumps({"version": 1, "dtype": dtype, "smoltrain": meta.get("version")}))
        for name, t in state.items():
            data, kind = _tensor(name, t, cfg, qtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
