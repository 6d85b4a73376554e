"""One decode product, streamed from memory: OpenBLAS fp32 vs the 8-bit kernel `--weights int8` uses.

    python bench/int8_kernels.py [--rows 98304] [--cols 576] [--prompt 19] [--out bench/results.jsonl]

A (rows x cols) weight, large enough not to stay in cache (the default is twice SmolLM2-135M's LM head),
times one fp32 vector, best of 10 calls, with one and with two numba threads (OpenBLAS takes its count
from OPENBLAS_NUM_THREADS, recorded; run once per count to compare like with like): numpy's OpenBLAS on the fp32
weight (k-major, as `generate` stores it) and smoltrain.model.int8_linear.product (numba) on the same
weight quantised. It shows whether 8-bit decoding can be faster than fp32 on this CPU: only if the kernel
multiplies more weights per second than OpenBLAS streams fp32 (BENCHMARKS.md). The same for --prompt
input rows at once (a prompt being read in), best of 3: OpenBLAS's matrix product vs the several-row loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402


def best_ms(f, *args, calls: int = 10) -> float:
    f(*args)
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        f(*args)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    from smoltrain.model.int8_linear import product, quantize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=98304)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--prompt", type=int, default=19, help="input rows of the prompt figure")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(a.rows, a.cols) * 0.02
    q, s, lo = (t.numpy() for t in quantize(w))
    k_major = np.ascontiguousarray(w.t().numpy())
    x = np.random.default_rng(0).standard_normal(a.cols, dtype=np.float32)
    prompt = np.random.default_rng(1).standard_normal((a.prompt, a.cols), dtype=np.float32)
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        fp32 = best_ms(np.matmul, x, k_major)  # OpenBLAS: its own threads (OPENBLAS_NUM_THREADS caps them)
        int8 = best_ms(product, x[None], q, s, lo)  # one row, as a decoded token
        fp32_prompt = best_ms(np.matmul, prompt, k_major, calls=3)
        int8_prompt = best_ms(product, prompt, q, s, lo, calls=3)
        n = a.rows * a.cols
        emit({"bench": "int8_kernels", "rows": a.rows, "cols": a.cols, "numba_threads": threads,
              "openblas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
              "fp32_ms": round(fp32, 2), "int8_ms": round(int8, 2), "fp32_gweights_per_s": round(n / fp32 / 1e6, 2),
              "int8_gweights_per_s": round(n / int8 / 1e6, 2), "int8_vs_fp32": round(fp32 / int8, 2),
              "prompt_rows": a.prompt, "fp32_prompt_ms": round(fp32_prompt, 2), "int8_prompt_ms": round(int8_prompt, 2),
              "int8_vs_fp32_prompt": round(fp32_prompt / int8_prompt, 2)}, a.out)


if __name__ == "__main__":
    main()
