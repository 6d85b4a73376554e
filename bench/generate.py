"""Greedy decoding speed: smoltrain `generate` vs transformers `generate`, same weights, same prompt.

    python bench/generate.py [--ckpt CKPT] [--new-tokens 128] [--rounds 5] [--out bench/results.jsonl]

Without --ckpt it imports the real SmolLM2-135M-Instruct from the asset cache (smoltrain assets).
Each measurement runs in a fresh subprocess (so neither side inherits the other's thread pools, caches
or allocator state), the two interleaved in ABBA order; each subprocess warms up once, then times
--repeats generations of --new-tokens tokens with EOS disabled and reports their median. The median
over rounds of each side is reported, and the greedy tokens of both sides must be identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def worker(a) -> None:
    """Load one side, warm up, time --repeats greedy generations; print the median tokens/s and the
    tokens as JSON."""
    from smoltrain.checkpoint import load_model
    from smoltrain.generate import SamplingConfig, generate, pick_device, prepare_for_decode

    device = pick_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    print(json.dumps({"tokens_per_sec": statistics.median(rates), "tokens": tokens,
                      "prompt_tokens": len(prompt), "device": device.type, "dtype": str(dtype)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per subprocess (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    from smoltrain.interop import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        if a.ckpt:
            ckpt = Path(a.ckpt)
        else:
            from smoltrain.assets import fetch_assets
            from smoltrain.interop import import_model

            ckpt = import_model(fetch_assets()["gguf"], Path(tmp) / "ckpt")
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")  # transformers reads the very same weights
        common = [sys.executable, __file__, "--ckpt", str(ckpt), "--hf-dir", str(hf_dir),
                  "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--device", a.device]
        runs = interleaved(common, ["smoltrain", "transformers"], a.rounds)
    same = all(r["tokens"] == runs["transformers"][0]["tokens"] for rs in runs.values() for r in rs)
    med = {k: statistics.median(r["tokens_per_sec"] for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        emit({"bench": "generate", "impl": k, "tokens_per_sec": round(med[k], 2), "new_tokens": a.new_tokens,
              "prompt_tokens": v[0]["prompt_tokens"], "device": v[0]["device"], "dtype": v[0]["dtype"],
              "identical_tokens": same, "rounds": [round(r["tokens_per_sec"], 2) for r in v]}, a.out)
    print(f"smoltrain {med['smoltrain']:.1f} tok/s, transformers {med['transformers']:.1f} tok/s, "
          f"ratio {med['smoltrain'] / med['transformers']:.2f}x, identical greedy tokens: {same}")
    if not same:
        sys.exit("The two sides produced different greedy tokens: the comparison is void.")


if __name__ == "__main__":
    main()
