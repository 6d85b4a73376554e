"""Greedy decoding speed: smoltrain `generate` vs transformers `generate`, same weights, same prompt.

    python bench/generate.py [--ckpt CKPT] [--new-tokens 128] [--rounds 5] [--out bench/results.jsonl]

Without --ckpt it imports the real SmolLM2-135M-Instruct from the asset cache (smoltrain assets).
Each measurement runs in a fresh subprocess (so neither side inherits the other's thread pools, caches
or allocator state), the two interleaved in ABBA order; each subprocess warms up once, then times
--repeats generations of --new-tokens tokens with EOS disabled and reports their median. The median
over rounds of each side is reported, and the greedy tokens of both sides must be identical.

Beside each speed: the worker's peak memory (max RSS on CPU, max allocated on CUDA). The smoltrain
worker also accounts for its time per token against this host's bound: the decode's weight products
alone, back to back (every byte of weights streamed once, as a token needs), and the rest (the small
ops between them); and it times --batch prompts decoded together (generate_batch, the --prompt-file
path), checking that each row's greedy tokens equal its one-by-one tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved, reference_checkpoint  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def worker(a) -> None:
    """Load one side, warm up, time --repeats greedy generations; print the median tokens/s and the
    tokens as JSON."""
    from smoltrain.device import amp_dtype, pick_device
    from smoltrain.hf.interop import load_model
    from smoltrain.model.generate import SamplingConfig, generate, prepare_for_decode

    device = pick_device(a.device)
    dtype = amp_dtype(device)
    n = a.new_tokens
    if a.worker == "smoltrain":
        model, tok, _ = load_model(a.ckpt, device=device, dtype=dtype)
        prepare_for_decode(model)  # what `smoltrain generate` does
        prompt = tok.encode(PROMPT)

        def run() -> list[int]:
            return list(generate(model, prompt, n, SamplingConfig(temperature=0), stop_ids=[]))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=dtype).to(device).eval()
        prompt = AutoTokenizer.from_pretrained(a.hf_dir).encode(PROMPT)
        ids = torch.tensor([prompt], device=device)

        @torch.inference_mode()
        def run() -> list[int]:
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
            return out[0, len(prompt):].tolist()
    run()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    for _ in range(a.repeats):
        sync()
        t = time.perf_counter()
        tokens = run()
        sync()
        rates.append(n / (time.perf_counter() - t))
    extra = account(model, prompt, tokens, n, a.batch) if a.worker == "smoltrain" and device.type == "cpu" else {}
    mem = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps({"tokens_per_sec": statistics.median(rates), "tokens": tokens, "peak_mem_gb": mem,
                      "prompt_tokens": len(prompt), "device": device.type, "dtype": str(dtype), **extra}))


def decode_products(model) -> list[torch.Tensor]:
    """The k-major weights one decoded token multiplies by (to_inference_layout), in decode order."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.fused_qkv, a.o_proj.weight_km, m.fused_gate_up, m.down_proj.weight_km]
    return out + [model.lm_head.weight_km]


def account(model, prompt: list[int], solo: list[int], n: int, batch: int) -> dict:
    """Where a token's time goes: the weight products alone (the memory-bandwidth part) vs the rest;
    and the batched path's total tokens/s, its rows checked against the one-by-one tokens."""
    from smoltrain.device import decode_threads
    from smoltrain.model import blas
    from smoltrain.model.generate import SamplingConfig, generate_batch

    weights = decode_products(model)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    times = []
    with torch.inference_mode(), decode_threads(torch.device("cpu")):
        xs = [torch.zeros(1, w.shape[0]) for w in weights]
        for _ in range(7):
            t = time.perf_counter()
            for x, w in zip(xs, weights):
                blas.matmul(x, w)
            times.append(time.perf_counter() - t)
    products = statistics.median(times[2:])
    prompts = [prompt[: len(prompt) - i] for i in range(batch)]  # different lengths: left padding in use
    t = time.perf_counter()
    rows = generate_batch(model, prompts, n, SamplingConfig(temperature=0), stop_ids=[])
    batched = batch * n / (time.perf_counter() - t)
    return {"weight_bytes": nbytes, "products_ms": products * 1e3, "products_gb_per_s": nbytes / products / 1e9,
            "bound_tokens_per_sec": 1 / products, "batch": batch, "batched_tokens_per_sec": batched,
            "batched_row0_equals_solo": rows[0] == solo}


def summarise_account(runs: list[dict]) -> dict:
    """Medians over rounds of the smoltrain worker's time account (empty for the other side)."""
    if "products_ms" not in runs[0]:
        return {}
    keys = ("products_ms", "products_gb_per_s", "bound_tokens_per_sec", "batched_tokens_per_sec")
    out = {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}
    out.update(weight_bytes=runs[0]["weight_bytes"], batch=runs[0]["batch"],
               batched_row0_equals_solo=all(r["batched_row0_equals_solo"] for r in runs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per subprocess (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together in the batched figure")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf_dir = reference_checkpoint(a.ckpt, Path(tmp))
        common = [sys.executable, __file__, "--ckpt", str(ckpt), "--hf-dir", str(hf_dir),
                  "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--device", a.device,
                  "--batch", str(a.batch)]
        runs = interleaved(common, ["smoltrain", "transformers"], a.rounds)
    same = all(r["tokens"] == runs["transformers"][0]["tokens"] for rs in runs.values() for r in rs)
    med = {k: statistics.median(r["tokens_per_sec"] for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        emit({"bench": "generate", "impl": k, "tokens_per_sec": round(med[k], 2), "new_tokens": a.new_tokens,
              "prompt_tokens": v[0]["prompt_tokens"], "device": v[0]["device"], "dtype": v[0]["dtype"],
              "identical_tokens": same, "rounds": [round(r["tokens_per_sec"], 2) for r in v],
              "peak_mem_gb": round(max(r["peak_mem_gb"] for r in v), 3), **summarise_account(v)}, a.out)
    print(f"smoltrain {med['smoltrain']:.1f} tok/s, transformers {med['transformers']:.1f} tok/s, "
          f"ratio {med['smoltrain'] / med['transformers']:.2f}x, identical greedy tokens: {same}")
    acc = summarise_account(runs["smoltrain"])
    if acc:
        ms = 1e3 / med["smoltrain"]
        print(f"per token {ms:.1f} ms: weight products {acc['products_ms']:.1f} ms ({acc['weight_bytes'] / 1e6:.0f} MB "
              f"at {acc['products_gb_per_s']:.1f} GB/s; bound {acc['bound_tokens_per_sec']:.1f} tok/s), other ops "
              f"{ms - acc['products_ms']:.1f} ms; batch of {acc['batch']}: {acc['batched_tokens_per_sec']:.1f} tok/s "
              f"in all, row 0 equals one-by-one: {acc['batched_row0_equals_solo']}")
    if not same:
        sys.exit("The two sides produced different greedy tokens: the comparison is void.")


if __name__ == "__main__":
    main()
