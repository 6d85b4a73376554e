"""Text generation with a preallocated KV cache: sample -> prefill -> decode_one_token -> generate.

Greedy decoding (temperature 0) gives exactly transformers' greedy `generate` tokens for the same model.
SamplingConfig (its defaults are the one set `smoltrain generate`, the demo and in-training samples share)
lives beside the architecture in model/config.py, so the training recipe (a core module) can default to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from smoltrain.device import decode_threads
from smoltrain.errors import UserError
from smoltrain.model import int8
from smoltrain.model.config import SamplingConfig, eos_ids
from smoltrain.model.llama import KVCache, SmolLM2, to_inference_layout

PROMPT_BATCH = 16  # prompts of a --prompt-file decoded together
__all__ = ["SamplingConfig", "generate", "generate_batch", "prepare_for_decode", "sample", "stream_text"]


# what `--weights` may ask for. "auto" (the demo's default) is int8 on a CPU: it holds the quality bars on the
# real SmolLM2-135M (argmax equal to fp32's at 98.8% of held-out positions, bpb within 0.02%) and decodes one
# prompt 2.1-2.3x faster than fp32 on an AVX-512 EPYC, 1.4x on an AVX2 one with an earlier kernel
# (BENCHMARKS.md); fp32 elsewhere. `generate` and the evaluations stay fp32
WEIGHTS = ("fp32", "int8")


def decode_weights(name: str, device: torch.device) -> str:
    """The weights to decode with on `device` ("auto" resolved); refuses int8 off the CPU before any work."""
    if name == "auto":
        return "int8" if int8.supported(device) else "fp32"
    if name not in WEIGHTS:
        raise UserError(f"--weights must be auto, fp32 or int8 (got {name!r}).")
    if name == "int8" and not int8.supported(device):
        raise UserError(f"--weights int8 is a CPU decoding path (a numba kernel for the CPU); this "
                        f"model would run on {device.type}. Use --device cpu, or --weights fp32.")
    return name


def prepare_for_decode(model: SmolLM2, weights: str = "fp32") -> SmolLM2:
    """On CPU, the inference weight layout: fp32 (to_inference_layout: k-major, fused projections,
    matrix-vector products through numpy's BLAS; the same weights, logits equal up to summation order), or
    8-bit weight-only (int8.to_int8: 1.25 bytes per weight instead of 4; fp32 models only). Inference only."""
    device = model.model.embed_tokens.weight.device
    if decode_weights(weights, device) == "int8":
        return int8.to_int8(model)
    if device.type != "cpu":
        return model
    return to_inference_layout(model)


def sample(logits: torch.Tensor, cfg: SamplingConfig, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from the last-position logits (B, V); `history` (B, S) for the penalty."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and history is not None:
        seen = logits.gather(1, history)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:  # keep the smallest set whose probability reaches top_p (always >= 1 token)
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def prefill(model: SmolLM2, ids: torch.Tensor, cache: KVCache, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompts (B, T) through the model, filling `cache`; logits of the last position (B, V)."""
    h = model.hidden_states(ids, start_pos=0, cache=cache, pad=pad)
    return model.lm_head(h[:, -1])


def decode_one_token(model: SmolLM2, token: torch.Tensor, slot: int, cache: KVCache,
                     pad: torch.Tensor | None = None) -> torch.Tensor:
    """One step: token (B, 1) at cache slot `slot` -> next-token logits (B, V)."""
    h = model.hidden_states(token, start_pos=slot, cache=cache, pad=pad)
    return model.lm_head(h[:, -1])


def token_budget(model: SmolLM2, prompt: list[int], max_new_tokens: int) -> int:
    """New tokens this prompt may get within the model's context; refuses empty or too-long prompts."""
    limit = model.config.max_position_embeddings
    if not prompt:
        raise UserError("The prompt is empty.")
    if len(prompt) >= limit:
        raise UserError(f"The prompt is {len(prompt)} tokens long; this model's context "
                        f"(max_position_embeddings) is {limit} tokens.")
    return min(max_new_tokens, limit - len(prompt))


@torch.inference_mode()
def generate(model: SmolLM2, prompt: list[int], max_new_tokens: int, cfg: SamplingConfig,
             seed: int | None = None, stop_ids: list[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (stops after max_new_tokens or at a stop id, not yielded).
    The KV cache belongs to this call: generations running side by side on one model are independent."""
    cfg.validate()
    max_new_tokens = token_budget(model, prompt, max_new_tokens)
    device = model.model.embed_tokens.weight.device
    stop = set(eos_ids(model.config) if stop_ids is None else stop_ids)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    cache = model.new_kv_cache(1, len(prompt) + max_new_tokens)
    logits = prefill(model, ids, cache)
    history = ids
    with decode_threads(device):
        for i in range(max_new_tokens):
            token = sample(logits, cfg, history, gen)  # (1,)
            tid = int(token)
            if tid in stop:
                return
            yield tid
            if i + 1 == max_new_tokens:
                return
            history = torch.cat([history, token[:, None]], dim=1) if cfg.repetition_penalty != 1.0 else history
            logits = decode_one_token(model, token[:, None], len(prompt) + i, cache)


def _sample_rows(logits: torch.Tensor, cfg: SamplingConfig, histories: list[torch.Tensor],
                 gens: list[torch.Generator | None]) -> torch.Tensor:
    """Next tokens (B,): each row sampled as generate() samples it alone (its own history and generator)."""
    if cfg.temperature == 0 and cfg.repetition_penalty == 1.0:
        return logits.float().argmax(dim=-1)
    return torch.cat([sample(logits[r : r + 1], cfg, histories[r], gens[r]) for r in range(logits.shape[0])])


@torch.inference_mode()
def generate_batch(model: SmolLM2, prompts: list[list[int]], max_new_tokens: int, cfg: SamplingConfig,
                   seeds: list[int | None] | None = None, stop_ids: list[int] | None = None) -> list[list[int]]:
    """Each prompt's new tokens, all prompts decoded together in one batch: the same tokens as generate()
    on each prompt alone (seeds[i] for prompt i), up to float summation order. Prompts of different
    lengths are left-padded; their positions start after the padding, which no query attends to."""
    cfg.validate()
    budgets = [token_budget(model, p, max_new_tokens) for p in prompts]
    device = model.model.embed_tokens.weight.device
    stop = set(eos_ids(model.config) if stop_ids is None else stop_ids)
    seeds = seeds or [None] * len(prompts)
    gens = [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + p for n, p in zip(pads, prompts)], device=device)  # (B, T)
    pad = torch.tensor(pads, device=device) if any(pads) else None
    histories = [torch.tensor([p], device=device) for p in prompts]
    cache = model.new_kv_cache(len(prompts), longest + max(budgets))
    logits = prefill(model, ids, cache, pad)
    out: list[list[int]] = [[] for _ in prompts]
    live = [b > 0 for b in budgets]
    with decode_threads(device):
        for i in range(max(budgets)):
            tokens = _sample_rows(logits, cfg, histories, gens)  # (B,)
            for r, tid in enumerate(tokens.tolist()):
                if live[r]:
                    live[r] = tid not in stop
                    out[r] += [tid] if live[r] else []
                    live[r] = live[r] and len(out[r]) < budgets[r]
            if not any(live):
                break
            if cfg.repetition_penalty != 1.0:
                histories = [torch.cat([h, t.view(1, 1)], dim=1) for h, t in zip(histories, tokens)]
            logits = decode_one_token(model, tokens[:, None], longest + i, cache, pad)
    return out


def stream_text(tokens: Iterator[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Turn token ids into text pieces; holds back incomplete UTF-8 sequences (shown as U+FFFD)."""
    ids: list[int] = []
    shown = ""
    for t in tokens:
        ids.append(t)
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text
    text = decode(ids)
    if len(text) > len(shown):
        yield text[len(shown):]
