"""Held-out loss, perplexity and bits-per-byte, for our checkpoints and for any HF model directory.

Bits per byte (nats / ln 2 / UTF-8 bytes of the predicted tokens) compares models across tokenizers;
loss and perplexity only compare models that share one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from smoltrain.errors import UserError
from smoltrain.tokenizer import Tokenizer


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens)."""
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    special = {t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special}
    byte_level = "ByteLevel" in json.dumps(json.loads(tok.backend.to_str()).get("decoder") or {})
    lengths = torch.zeros(max(vocab.values()) + 1, dtype=torch.long)
    for piece, i in vocab.items():
        if piece in special:
            continue
        # byte-level BPE spells every byte as one character; otherwise decode and count
        lengths[i] = len(piece) if byte_level else len(tok.decode([i]).encode("utf-8"))
    return lengths


@torch.no_grad()
def evaluate_batches(forward, batches: Iterable[torch.Tensor], device: torch.device,
                     byte_lengths: torch.Tensor | None = None, autocast=contextlib.nullcontext) -> dict:
    """Mean loss over all predicted tokens of (B, T+1) windows; `forward(x) -> logits` or `(x, y) -> sum`."""
    nats, tokens, nbytes = 0.0, 0, 0
    for w in batches:
        w = w.to(device)
        x, y = w[:, :-1], w[:, 1:]
        with autocast():
            out = forward(x, y)
        if out.ndim > 0:  # logits from an HF model
            out = F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="sum")
        nats += float(out)
        tokens += y.numel()
        if byte_lengths is not None:
            nbytes += int(byte_lengths.to(device)[y.clamp(max=len(byte_lengths) - 1)].sum())
    if tokens == 0:
        raise UserError("The evaluation split holds no complete window to evaluate.")
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens,
            "bpb": nats / math.log(2) / nbytes if nbytes else None}


def _hf_forward(path: Path, device: torch.device):
    """A forward for a model our Llama loader does not handle (any HF causal LM)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except Exception as e:
        raise UserError(f"transformers could not load {path}: {e}") from None
    model = model.to(device).eval()
    return lambda x, y: model(x).logits


def load_forward(path: str, device: torch.device) -> tuple[object, Tokenizer, str]:
    from smoltrain.checkpoint import load_resolved, resolve_checkpoint
    from smoltrain.tokenizer import load_tokenizer

    directory = resolve_checkpoint(path)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory}/config.json is missing or not valid JSON ({e}).") from None
    if not isinstance(hf, dict):
        raise UserError(f"{directory}/config.json must hold a JSON object, not {type(hf).__name__}.")
    model_type = hf.get("model_type")
    if model_type != "llama":  # any other causal LM: let transformers run it
        return _hf_forward(directory, device), load_tokenizer(directory), str(directory)
    model, tok, _ = load_resolved(directory, device=device)
    return (lambda x, y: model(x, labels=y, loss_chunk=4096, reduction="sum")), tok, str(directory)


def _check_context(directory: Path, seq_len: int | None) -> None:
    """Windows longer than the model's positions fail inside attention: refuse them by name instead."""
    hf = json.loads((directory / "config.json").read_text())  # load_forward read it already
    limit = hf.get("max_position_embeddings") or hf.get("n_positions")
    if seq_len is not None and isinstance(limit, int) and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the context of {directory} ({limit} tokens, "
                        f"max_position_embeddings); pass --seq-len {limit} or less.")


def evaluate_models(paths: list[str], data: str | Path, split: str, seq_len: int, batch_size: int,
                    max_batches: int | None, device: torch.device) -> list[dict]:
    """One row (model, loss, ppl, bpb, tokens) per model, on the same windows of a prepared split."""
    from smoltrain.data.loader import eval_windows
    from smoltrain.data.shards import load_meta

    meta = load_meta(data)
    rows = []
    for path in paths:
        forward, tok, name = load_forward(str(path), device)
        _check_context(Path(name), seq_len)
        if tok.sha256 != meta["tokenizer"]["sha256"] and tok.backend.get_vocab() != data_vocab(str(data)):
            raise UserError(f"{name} uses a different tokenizer than the data in {data} "
                            f"({meta['tokenizer']['source']}); losses would not be comparable.")
        batches = eval_windows(data, split, seq_len, batch_size, max_batches)
        rows.append({"model": name, "split": split,
                     **evaluate_batches(forward, batches, device, token_byte_lengths(tok))})
    return rows


def eval_cli(a) -> int:
    """`smoltrain eval MODEL [MODEL ...] --data DIR`: one row per model, as a table or JSON."""
    from smoltrain.generate import pick_device

    rows = evaluate_models(a.models, a.data, a.split, a.seq_len, a.batch_size, a.max_batches, pick_device(a.device))
    if a.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    else:
        print(f"{'model':<48} {'loss':>8} {'ppl':>10} {'bpb':>7} {'tokens':>10}")
        for r in rows:
            bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "-"
            print(f"{r['model'][-48:]:<48} {r['loss']:>8.4f} {r['ppl']:>10.2f} {bpb:>7} {r['tokens']:>10,}")
    return 0


def data_vocab(data_dir: str) -> dict | None:
    from smoltrain.tokenizer import load_tokenizer

    tok_dir = Path(data_dir) / "tokenizer"
    return load_tokenizer(tok_dir).backend.get_vocab() if (tok_dir / "tokenizer.json").exists() else None
