"""Held-out loss, perplexity and bits-per-byte, for our checkpoints and for any HF model directory.

Loss is the mean NLL of every predicted token (`<|endoftext|>` included, as in training). Bits per byte
follows nanochat's convention: the NLL of the predicted *non-special* tokens / (ln 2 x the UTF-8 bytes
those tokens stand for); predictions of special tokens (`<|endoftext|>` between documents) count in
neither, since they stand for no text. Bits per byte compares models across tokenizers; loss and
perplexity only compare models that share one.

The in-loop evaluation and `smoltrain eval` share `evaluate_datasets`: the same windows (data.loader
.eval_spans: the whole split, or a fixed spread sample under a token cap) give the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from smoltrain.data.tokenizer import Tokenizer
from smoltrain.errors import UserError


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


def special_token_mask(tok: Tokenizer) -> torch.Tensor:
    """True at the ids of special tokens (excluded from bits per byte)."""
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    mask = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for i, t in tok.backend.get_added_tokens_decoder().items():
        mask[i] = mask[i] or t.special
    return mask


class TokenTables:
    """Per-id byte lengths and special flags of one tokenizer, moved to a device once."""

    def __init__(self, tok: Tokenizer):
        self.byte_lengths = token_byte_lengths(tok)
        self.special = special_token_mask(tok)

    def to(self, device: torch.device) -> TokenTables:
        self.byte_lengths = self.byte_lengths.to(device)
        self.special = self.special.to(device)
        return self

    def lookup(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bytes, is-text) of each label; ids past the tables (a model vocab padded beyond the tokenizer's)
        count as text of 0 bytes."""
        inside = y < len(self.byte_lengths)
        safe = y.clamp(max=len(self.byte_lengths) - 1)
        return self.byte_lengths[safe] * inside, ~self.special[safe] | ~inside


@torch.no_grad()
def evaluate_batches(forward, batches: Iterable[torch.Tensor], device: torch.device, tables: TokenTables,
                     autocast=contextlib.nullcontext) -> dict:
    """Sums over (B, L+1) windows; `forward(x, y)` returns per-token NLL (B, L) or logits (B, L, V)."""
    nats = text_nats = 0.0
    tokens = nbytes = 0
    for w in batches:
        w = w.to(device)
        x = w[:, :-1]
        y = w[:, 1:]
        with autocast():
            out = forward(x, y)
        if out.ndim == 3:  # logits from an HF model
            out = F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="none")
        nll = out.float().reshape(y.shape)
        nb, text = tables.lookup(y)
        nats += float(nll.sum())
        text_nats += float((nll * text).sum())
        tokens += y.numel()
        nbytes += int(nb.sum())
    return summarize(nats, text_nats, tokens, nbytes)


def summarize(nats: float, text_nats: float, tokens: int, nbytes: int) -> dict:
    loss = nats / tokens if tokens else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": text_nats / math.log(2) / nbytes if nbytes else None,
            "tokens": tokens, "bytes": nbytes, "nats": nats, "text_nats": text_nats}


def combine(results: Iterable[dict]) -> dict:
    """The token-weighted total of several datasets' results."""
    rs = list(results)
    return summarize(sum(r["nats"] for r in rs), sum(r["text_nats"] for r in rs), sum(r["tokens"] for r in rs),
                     sum(r["bytes"] for r in rs))


def evaluate_datasets(forward, paths: Mapping[str, str | Path], split: str, seq_len: int, batch_size: int,
                      max_tokens: int | None, device: torch.device, tables: TokenTables,
                      autocast=contextlib.nullcontext) -> dict[str, dict]:
    """name -> result on each dataset's `split` (max_tokens caps each dataset); datasets whose split has
    nothing to predict are left out."""
    from smoltrain.data.loader import eval_windows
    from smoltrain.data.shards import load_meta

    out = {}
    for name, path in paths.items():
        if load_meta(path)["splits"].get(split, {}).get("num_tokens", 0) < 2:
            continue
        batches = eval_windows(path, split, seq_len, batch_size, max_tokens)
        out[name] = evaluate_batches(forward, batches, device, tables, autocast)
    return out


def val_record(step: int, results: Mapping[str, dict]) -> dict:
    """The metrics.jsonl record of one evaluation: the total as val_loss / val_ppl / val_bpb, and per
    dataset val/NAME/loss and val/NAME/bpb."""
    total = combine(results.values())
    rec = {"step": step, "val_loss": total["loss"], "val_ppl": total["ppl"], "val_bpb": total["bpb"],
           "val_tokens": total["tokens"]}
    for name, r in results.items():
        rec[f"val/{name}/loss"] = r["loss"]
        rec[f"val/{name}/bpb"] = r["bpb"]
        rec[f"val/{name}/tokens"] = r["tokens"]
    return rec


def load_forward(path: str, device: torch.device) -> tuple[object, Tokenizer, str]:
    """(forward(x, y) -> per-token NLL or logits, tokenizer, resolved directory) of a checkpoint or HF dir."""
    from smoltrain.hf.interop import load_causal_lm
    from smoltrain.model.llama import SmolLM2

    model, tok, directory = load_causal_lm(path, device)
    if isinstance(model, SmolLM2):
        return (lambda x, y: model(x, labels=y, loss_chunk="auto", reduction="none")), tok, str(directory)
    return (lambda x, y: model(x).logits), tok, str(directory)  # any other causal LM, run by transformers


def default_shape(directory: Path) -> tuple[int, int, int]:
    """(seq_len, batch_size, context) to evaluate a model with by default: a training checkpoint's own
    train.seq_len and micro_batch_size (so the numbers equal its run's in-loop evaluation), else the model's
    whole context, a few thousand tokens per batch."""
    import yaml

    from smoltrain.hf.interop import hf_config

    hf = hf_config(directory)
    context = int(hf.get("max_position_embeddings") or hf.get("n_positions") or hf.get("n_ctx") or 2048)
    run = directory / "config.yaml"
    train = {}
    if run.exists():
        try:
            train = (yaml.safe_load(run.read_text()) or {}).get("train") or {}
        except yaml.YAMLError:
            train = {}
    seq_len = int(train.get("seq_len") or context)
    return min(seq_len, context), int(train.get("micro_batch_size") or max(1, 8192 // seq_len)), context


def evaluate_models(paths: list[str], data: str | Path, split: str = "val", seq_len: int | None = None,
                    batch_size: int | None = None, max_tokens: int | None = None,
                    device: torch.device | str = "cpu") -> list[dict]:
    """One row (model, loss, ppl, bpb, tokens, seq_len) per model on a prepared split: the whole split by
    default, every token predicted once with windows of the model's training length (see default_shape)."""
    from smoltrain.checkpoint.discovery import resolve_checkpoint
    from smoltrain.data.shards import load_meta

    device = torch.device(device)
    meta = load_meta(data)
    if meta["splits"].get(split, {}).get("num_tokens", 0) < 2:
        raise UserError(f"The {split} split of {data} holds no tokens to evaluate (prepare held out no documents?).")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}.")
    rows = []
    for path in paths:
        directory = resolve_checkpoint(str(path))
        t, b, context = default_shape(directory)
        t = seq_len or t
        b = batch_size or b
        if not 1 <= t <= context or b < 1:
            raise UserError(f"--seq-len {t} / --batch-size {b} do not fit {directory}: its context is {context} "
                            "tokens (max_position_embeddings); pass --seq-len between 1 and that.")
        forward, tok, name = load_forward(str(directory), device)
        if tok.sha256 != meta["tokenizer"]["sha256"] and tok.backend.get_vocab() != data_vocab(str(data)):
            raise UserError(f"{name} uses a different tokenizer than the data in {data} "
                            f"({meta['tokenizer']['source']}); losses would not be comparable.")
        res = evaluate_datasets(forward, {"data": data}, split, t, b, max_tokens, device, TokenTables(tok).to(device))
        r = res["data"]
        rows.append({"model": name, "split": split, "loss": r["loss"], "ppl": r["ppl"], "bpb": r["bpb"],
                     "tokens": r["tokens"], "bytes": r["bytes"], "seq_len": t, "max_tokens": max_tokens})
    return rows


def data_vocab(data_dir: str) -> dict | None:
    from smoltrain.data.tokenizer import load_tokenizer

    tok_dir = Path(data_dir) / "tokenizer"
    return load_tokenizer(tok_dir).backend.get_vocab() if (tok_dir / "tokenizer.json").exists() else None
