"""fp32 vs `--weights int8` greedy decoding in one process: both models loaded side by side, generations
interleaved (ABBA), best per-token time of each. For hosts too loaded for bench/generate.py's fresh
subprocesses; the ratio is what it measures.

    OPENBLAS_NUM_THREADS=1 python bench/decode_ab.py --ckpt CKPT [--new-tokens 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

from smoltrain.hf.interop import load_model
from smoltrain.model.generate import SamplingConfig, generate, prepare_for_decode

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    models = {}
    for weights in ("fp32", "int8"):
        model, tok, _ = load_model(a.ckpt)
        models[weights] = prepare_for_decode(model, weights)
    prompt = tok.encode(PROMPT)
    best = dict.fromkeys(models, float("inf"))
    tokens = {}
    for r in range(a.rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t = time.perf_counter()
            tokens[name] = list(generate(models[name], prompt, a.new_tokens, SamplingConfig(temperature=0), stop_ids=[]))
            per_token = (time.perf_counter() - t) / a.new_tokens
            best[name] = min(best[name], per_token)
            print(f"{name} {per_token * 1e3:.0f} ms/token", flush=True)
    same = sum(x == y for x, y in zip(tokens["fp32"], tokens["int8"]))
    print(f"fp32 {1 / best['fp32']:.2f} tok/s, int8 {1 / best['int8']:.2f} tok/s: int8 at "
          f"{best['fp32'] / best['int8']:.2f}x fp32; {same}/{a.new_tokens} greedy tokens equal")


if __name__ == "__main__":
    main()
