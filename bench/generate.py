"""Greedy decoding speed: smoltrain `generate` (fp32 and `--weights int8`) vs transformers `generate`
(fp32), and llama.cpp's Q8_0 of the same model where llama-cpp-python is installed; same prompt.

    python bench/generate.py [--ckpt CKPT] [--new-tokens 128] [--rounds 5] [--out bench/results.jsonl]

Without --ckpt it imports the real SmolLM2-135M-Instruct from the asset cache (smoltrain assets).
Each measurement runs in a fresh subprocess (so no side inherits another's thread pools, caches or
allocator state), the sides interleaved in ABBA order; each subprocess warms up once, then times
--repeats generations of --new-tokens tokens with EOS disabled and reports their median. The median
over rounds of each side is reported; smoltrain fp32 and transformers must give identical greedy
tokens, and the int8 and Q8_0 sides report how many of their greedy tokens agree with fp32's.
llama.cpp reads a Q8_0 GGUF: `smoltrain export --format gguf --dtype q8_0` where that exists, else (for
the reference model) llama.cpp's own quantizer applied to the asset GGUF.

Beside each speed: the worker's peak memory (max RSS on CPU, max allocated on CUDA). The smoltrain
worker also accounts for its time per token against this host's bound: the decode's weight products
alone, back to back (every byte of weights streamed once, as a token needs), and the rest (the small
ops between them); and it times --batch prompts decoded together (generate_batch, the --prompt-file
path), checking that each row's greedy tokens equal its one-by-one tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved, reference_checkpoint  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
WEIGHTS = {"smoltrain": "fp32", "int8": "int8"}  # our sides: `smoltrain generate --weights ...`


def smoltrain_side(a, device, dtype):
    """(run, prompt ids, model) of `smoltrain generate --weights fp32|int8` with EOS disabled."""
    from smoltrain.hf.interop import load_model
    from smoltrain.model.generate import SamplingConfig, generate, prepare_for_decode

    model, tok, _ = load_model(a.ckpt, device=device, dtype=dtype)
    prepare_for_decode(model, WEIGHTS[a.worker])  # what `smoltrain generate` does
    prompt = tok.encode(PROMPT)

    def run() -> list[int]:
        return list(generate(model, prompt, a.new_tokens, SamplingConfig(temperature=0), stop_ids=[]))
    return run, prompt, model


def transformers_side(a, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=dtype).to(device).eval()
    prompt = AutoTokenizer.from_pretrained(a.hf_dir).encode(PROMPT)
    ids = torch.tensor([prompt], device=device)

    @torch.inference_mode()
    def run() -> list[int]:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                          min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    return run, prompt, None


def llama_cpp_side(a, device, dtype):
    """llama.cpp on the Q8_0 GGUF, greedy (top-k 1), all cores, fed our prompt ids (the same vocabulary)."""
    from llama_cpp import Llama

    from smoltrain.data.tokenizer import load_tokenizer

    llm = Llama(model_path=a.gguf, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    prompt = load_tokenizer(a.ckpt).encode(PROMPT)

    def run() -> list[int]:
        out = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) == a.new_tokens:
                return out
        return out
    return run, prompt, None


SIDES = {"smoltrain": smoltrain_side, "int8": smoltrain_side, "transformers": transformers_side,
         "llama.cpp": llama_cpp_side}


def worker(a) -> None:
    """Load one side, warm up, time --repeats greedy generations; print the median tokens/s and the
    tokens as JSON."""
    from smoltrain.device import amp_dtype, pick_device

    device = pick_device(a.device)
    dtype = amp_dtype(device)
    n = a.new_tokens
    run, prompt, model = SIDES[a.worker](a, device, dtype)
    run()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    for _ in range(a.repeats):
        sync()
        t = time.perf_counter()
        tokens = run()
        sync()
        rates.append(n / (time.perf_counter() - t))
    extra = account(model, prompt, tokens, n, a.batch) if model is not None and device.type == "cpu" else {}
    mem = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps({"tokens_per_sec": statistics.median(rates), "tokens": tokens, "peak_mem_gb": mem,
                      "prompt_tokens": len(prompt), "device": device.type, "dtype": str(dtype), **extra}))


def decode_products(model) -> list[torch.nn.Module]:
    """The products one decoded token runs (fp32 k-major or int8), in decode order."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.fused_qkv, a.o_proj, m.fused_gate_up, m.down_proj]
    return out + [model.lm_head]


def product_shape(p: torch.nn.Module) -> tuple[int, int]:
    """(in_features, bytes of weights read per token) of a decode product."""
    if hasattr(p, "qweight"):  # int8: the 8-bit weights and their fp32 scales and minima per block
        extra = (p.scales.numel() + p.mins.numel()) * p.scales.element_size()
        return p.qweight.shape[1], p.qweight.numel() + extra
    return p.weight.shape[1], p.weight.numel() * p.weight.element_size()


def account(model, prompt: list[int], solo: list[int], n: int, batch: int) -> dict:
    """Where a token's time goes: the weight products alone (the memory-bandwidth part) vs the rest;
    and the batched path's total tokens/s, its rows checked against the one-by-one tokens."""
    from smoltrain.device import decode_threads
    from smoltrain.model.generate import SamplingConfig, generate_batch

    products = decode_products(model)
    shapes = [product_shape(p) for p in products]
    nbytes = sum(b for _, b in shapes)
    times = []
    with torch.inference_mode(), decode_threads(torch.device("cpu")):
        xs = [torch.zeros(1, k) for k, _ in shapes]
        for _ in range(7):
            t = time.perf_counter()
            for x, p in zip(xs, products):
                p(x)
            times.append(time.perf_counter() - t)
    products_s = statistics.median(times[2:])
    prompts = [prompt[: len(prompt) - i] for i in range(batch)]  # different lengths: left padding in use
    t = time.perf_counter()
    rows = generate_batch(model, prompts, n, SamplingConfig(temperature=0), stop_ids=[])
    batched = batch * n / (time.perf_counter() - t)
    return {"weight_bytes": nbytes, "products_ms": products_s * 1e3, "products_gb_per_s": nbytes / products_s / 1e9,
            "bound_tokens_per_sec": 1 / products_s, "batch": batch, "batched_tokens_per_sec": batched,
            "batched_row0_equals_solo": rows[0] == solo}


def summarise_account(runs: list[dict]) -> dict:
    """Medians over rounds of a smoltrain worker's time account (empty for the other sides)."""
    if "products_ms" not in runs[0]:
        return {}
    keys = ("products_ms", "products_gb_per_s", "bound_tokens_per_sec", "batched_tokens_per_sec")
    out = {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}
    out.update(weight_bytes=runs[0]["weight_bytes"], batch=runs[0]["batch"],
               batched_row0_equals_solo=all(r["batched_row0_equals_solo"] for r in runs))
    return out


def q8_0_gguf(ckpt: Path, tmp: Path) -> Path | None:
    """A Q8_0 GGUF of the checkpoint for llama.cpp, or None without llama-cpp-python: our GGUF export where
    this smoltrain has it, else llama.cpp's quantizer on the GGUF an imported checkpoint came from."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    out = tmp / "q8_0.gguf"
    export = [sys.executable, "-m", "smoltrain", "export", str(ckpt), "--format", "gguf", "--dtype", "q8_0",
              "--out", str(out)]
    if subprocess.run(export, capture_output=True).returncode == 0:
        return out
    source = Path(json.loads((ckpt / "origin.json").read_text())["source"]) if (ckpt / "origin.json").exists() else None
    if source is None or source.suffix != ".gguf":
        return None
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    return out if rc == 0 else None


def report(runs: dict[str, list[dict]], a) -> None:
    """One JSON line per side, then the ratios and the fp32 / int8 time accounts."""
    reference = runs["smoltrain"][0]["tokens"]
    same = all(r["tokens"] == reference for k in ("smoltrain", "transformers") for r in runs[k])
    med = {k: statistics.median(r["tokens_per_sec"] for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        agree = sum(x == y for x, y in zip(v[0]["tokens"], reference))
        emit({"bench": "generate", "impl": k, "tokens_per_sec": round(med[k], 2), "new_tokens": a.new_tokens,
              "prompt_tokens": v[0]["prompt_tokens"], "device": v[0]["device"], "dtype": v[0]["dtype"],
              "identical_tokens": same, "tokens_equal_to_fp32": agree,
              "vs_transformers": round(med[k] / med["transformers"], 2),
              "rounds": [round(r["tokens_per_sec"], 2) for r in v],
              "peak_mem_gb": round(max(r["peak_mem_gb"] for r in v), 3), **summarise_account(v)}, a.out)
    print(", ".join(f"{k} {med[k]:.1f} tok/s ({med[k] / med['transformers']:.2f}x transformers)" for k in med))
    print(f"smoltrain fp32 and transformers identical greedy tokens: {same}")
    for k in WEIGHTS:
        acc = summarise_account(runs[k])
        if acc:
            ms = 1e3 / med[k]
            print(f"{k}: per token {ms:.1f} ms: weight products {acc['products_ms']:.1f} ms "
                  f"({acc['weight_bytes'] / 1e6:.0f} MB at {acc['products_gb_per_s']:.1f} GB/s; bound "
                  f"{acc['bound_tokens_per_sec']:.1f} tok/s), other ops {ms - acc['products_ms']:.1f} ms; batch of "
                  f"{acc['batch']}: {acc['batched_tokens_per_sec']:.1f} tok/s in all, row 0 equals one-by-one: "
                  f"{acc['batched_row0_equals_solo']}")
    if not same:
        sys.exit("smoltrain fp32 and transformers produced different greedy tokens: the comparison is void.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per subprocess (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together in the batched figure")
    ap.add_argument("--sides", default=None, help="comma-separated subset of smoltrain,int8,transformers,llama.cpp")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf_dir = reference_checkpoint(a.ckpt, Path(tmp))
        gguf = q8_0_gguf(Path(ckpt), Path(tmp))
        sides = ["smoltrain", "int8", "transformers"] + (["llama.cpp"] if gguf else [])
        sides = [s for s in sides if a.sides is None or s in a.sides.split(",") or s in ("smoltrain", "transformers")]
        if gguf is None:
            print("llama.cpp side skipped: llama-cpp-python is not installed (or no Q8_0 GGUF could be made)")
        common = [sys.executable, __file__, "--ckpt", str(ckpt), "--hf-dir", str(hf_dir), "--gguf", str(gguf),
                  "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--device", a.device,
                  "--batch", str(a.batch)]
        runs = interleaved(common, sides, a.rounds)
    report(runs, a)


if __name__ == "__main__":
    main()
