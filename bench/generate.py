"""Greedy decoding speed: smoltrain `generate` vs transformers `generate`, same weights, same prompt.

    python bench/generate.py [--ckpt CKPT] [--new-tokens 128] [--rounds 3] [--out bench/results.jsonl]

Without --ckpt it imports the real SmolLM2-135M-Instruct from the asset cache (smoltrain assets).
Both run in this one process, interleaved round by round; the median tokens/s of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from smoltrain.checkpoint import load_model  # noqa: E402
from smoltrain.generate import SamplingConfig, generate, pick_device, prepare_for_decode  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def ensure_checkpoint(ckpt: str | None, work: Path) -> Path:
    if ckpt:
        return Path(ckpt)
    from smoltrain.assets import fetch_assets
    from smoltrain.interop import import_model

    return import_model(fetch_assets()["gguf"], work / "ckpt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from smoltrain.interop import export_hf

    device = pick_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ensure_checkpoint(a.ckpt, Path(tmp))
        ours, tok, _ = load_model(ckpt, device=device, dtype=dtype)
        prepare_for_decode(ours)  # what `smoltrain generate` does
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    prompt = tok.encode(PROMPT)
    ids = torch.tensor([prompt], device=device)
    n = a.new_tokens

    def run_ours() -> list[int]:
        return list(generate(ours, prompt, n, SamplingConfig(temperature=0), stop_ids=[]))

    @torch.inference_mode()
    def run_hf() -> list[int]:
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()

    def timed(fn) -> tuple[float, list[int]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        toks = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t), toks

    run_ours(), run_hf()  # warm-up
    rates: dict[str, list[float]] = {"smoltrain": [], "transformers": []}  # per round, interleaved
    same = True
    for _ in range(a.rounds):
        r1, t1 = timed(run_ours)
        r2, t2 = timed(run_hf)
        rates["smoltrain"].append(r1)
        rates["transformers"].append(r2)
        same &= t1 == t2
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        emit({"bench": "generate", "impl": k, "tokens_per_sec": round(v, 2), "new_tokens": n,
              "prompt_tokens": len(prompt), "device": device.type, "dtype": str(dtype),
              "rounds": [round(r, 2) for r in rates[k]]}, a.out)
    print(f"smoltrain {med['smoltrain']:.1f} tok/s, transformers {med['transformers']:.1f} tok/s, "
          f"ratio {med['smoltrain'] / med['transformers']:.2f}x, identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
