"""One bias-free linear layer with 8-bit weights for CPU decoding: uint8 with an fp32 scale and minimum per
32-weight block, fp32 activations. It needs torch, numpy and numba only: `smoltrain export --space` copies
this file beside the Space's app.py, so smoltrain's decoding and the Space's run the same code.

Why: decoding one token at a time streams every weight once per token, so its speed on a CPU is bounded
by bytes of weights / memory bandwidth, and its memory by the weights. 8 bits and a scale and a minimum per
32 weights are 1.25 bytes per weight against fp32's 4 (SmolLM2-135M: 168 MB per token instead of 538 MB).

Why 32-weight blocks with a minimum: the teacher-forced next-token argmax on held-out text must agree with
fp32's at >= 98% of positions (BENCHMARKS.md, bench/int8_quality.py). On the real SmolLM2-135M one
symmetric scale per output row gave 95.2%, symmetric 32-weight blocks 97.3%, a scale and a minimum per
64-weight block 97.1%, and a scale and a minimum per 32-weight block (w ~ lo + s * q, q in 0..255: an
8-bit grid over each block's own range) 98.8%. 32 is also the block of llama.cpp's formats.

Why numba: torch has no vectorised int8 weight-only product for x86 CPUs without AVX-512
(`aten._weight_int8pack_mm` and an inductor-compiled reduction both ran at ~1 GMAC/s on an AVX2 EPYC).
numba's LLVM turns the loops of `product` into vector code that widens the bytes in registers (for one row
no fp32 copy of a weight is written; for several, one output row's at a time, in L1), output rows spread
over the cores; it is compiled once per machine (_CACHE). It keeps the GIL (nogil=True cost ~3% a token
here, and the demo's two panes take turns on the kernel anyway).
Up to KERNEL_ROWS rows (a decoded token, a prompt, a batch of prompts) go through the kernel, each weight
read once for all of them; more rows (an evaluation window) through BLAS on the dequantised weight.
Measured (BENCHMARKS.md): on an AVX-512 EPYC a decoded token's products stream their 168 MB at 21-23 GB/s on
2 cores (about fp32's rate: the memory bound) and one prompt decodes 4.0-4.4x faster than transformers, 2.1-2.3x our fp32; on an AVX2 EPYC an earlier
version of the kernel was compute-bound at ~5 G weights/s per core (2.1x transformers).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from torch import nn

GROUP = 32  # weights per block along the input dimension (the whole row when it does not divide it)
KERNEL_ROWS = 64  # up to this many rows (a prompt, a batch of prompts) go through the kernel, more through BLAS
# one numba parallel call at a time: without an OpenMP or TBB runtime numba's workqueue layer aborts the
# process on concurrent calls (the demo decodes for two panes in two threads); each call uses every core
_NUMBA = threading.Lock()


def group_size(k: int) -> int:
    return GROUP if k % GROUP == 0 else k


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 q (N, K), fp32 scales (N, G), fp32 minima (N, G)) of a weight (N, K), G = K / group_size(K):
    w[n, k] ~ mins[n, g] + scales[n, g] * q[n, k] for k in block g, rounded to the nearest of 256 levels."""
    w = w.detach().float()
    n, k = w.shape
    blocks = w.reshape(n, k // group_size(k), group_size(k))
    lo = blocks.amin(dim=2)
    scales = ((blocks.amax(dim=2) - lo) / 255).clamp(min=1e-12)  # a constant block keeps a finite scale
    q = torch.round((blocks - lo[..., None]) / scales[..., None]).clamp(0, 255).to(torch.uint8)
    return q.reshape(n, k).contiguous(), scales.contiguous(), lo.contiguous()


# numba's on-disk cache lives beside this file: inside smoltrain's install, not inside a Space folder
# (files there would make `export --space --force` refuse the folder as not ours)
_CACHE = __package__ == "smoltrain.model"


def _jit(fn):
    """numba's parallel, fast-math compilation of `fn`, cached on disk where numba finds a writable place
    (beside this file, else the user's cache dir): without one (a read-only install and HOME) numba refuses
    to cache at all, so compile in memory on every start instead of failing."""
    import numba

    try:
        return numba.njit(parallel=True, fastmath=True, cache=_CACHE)(fn)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        if "no locator" not in str(e):
            raise
        return numba.njit(parallel=True, fastmath=True)(fn)


@functools.cache
def _dequantize():
    """The fp32 weight (N, K) of (q, s, lo) in one parallel pass, compiled by numba on first use: inputs of
    more than KERNEL_ROWS rows multiply it through BLAS (torch's elementwise ops would take four passes)."""
    import numba

    @_jit
    def dequantize(q, s, lo):  # pragma: no cover  (compiled; its results are tested)
        n_out, k_in = q.shape
        groups = s.shape[1]
        g = k_in // groups
        w = np.empty((n_out, k_in), dtype=np.float32)
        for n in numba.prange(n_out):
            for j in range(groups):
                base = j * g
                for i in range(g):
                    w[n, base + i] = np.float32(q[n, base + i]) * s[n, j] + lo[n, j]
        return w

    return dequantize


def product(x: np.ndarray, q: np.ndarray, s: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """out (M, N) = x (M, K) @ dequant(q, s, lo)^T through numba; two loops because one row and several rows
    are bound by different things (BENCHMARKS.md, bench/int8_kernels.py). Callers hold _NUMBA."""
    if x.shape[0] == 1 and q.shape[1] == s.shape[1] * GROUP:
        return _one_row()(x, q, s, lo)
    return _rows()(x, q, s, lo)


@functools.cache
def _one_row():
    """A decoded token in 32-weight blocks: weights are read once and multiplied straight from their bytes;
    a block's products go into 32 accumulators scaled by the block's scale, summed across lanes once per
    output (one sum per block took ~30% more time on an AVX-512 EPYC; compiled for AVX2, in cache, 8.8 vs 5.9 G
    weights/s per core: BENCHMARKS.md)."""
    import numba

    @_jit
    def one_row(x, q, s, lo):  # pragma: no cover  (compiled; its results are tested)
        n_out, k_in = q.shape
        groups = s.shape[1]
        xsum = x.reshape(groups, GROUP).sum(axis=1)  # the minima's share: lo[n, j] * sum of block j of x
        out = np.empty((1, n_out), dtype=np.float32)
        for n in numba.prange(n_out):
            lanes = np.zeros(GROUP, dtype=np.float32)
            shift = np.float32(0.0)
            for j in range(groups):
                base = j * GROUP
                sj = s[n, j]
                for i in range(GROUP):
                    lanes[i] += x[0, base + i] * np.float32(q[n, base + i]) * sj
                shift += lo[n, j] * xsum[j]
            out[0, n] = lanes.sum() + shift
        return out

    return one_row


@functools.cache
def _rows():
    """Several rows (a prompt, a batch), or a row the block does not divide: output row n's weights are
    dequantised once into an fp32 row that stays in L1, then dotted with 4 input rows at a time (which share
    each weight load); converting the bytes again for every input row took 1.8x the time for 19 rows."""
    import numba

    @_jit
    def rows_product(x, q, s, lo):  # pragma: no cover  (compiled; its results are tested)
        n_out, k_in = q.shape
        rows = x.shape[0]
        groups = s.shape[1]
        g = k_in // groups
        out = np.empty((rows, n_out), dtype=np.float32)
        for n in numba.prange(n_out):
            w = np.empty(k_in, dtype=np.float32)
            # _dequantize's loop, written again: a shared @njit row helper measured 10-25% slower here
            for j in range(groups):
                base = j * g
                sj = s[n, j]
                lj = lo[n, j]
                for i in range(g):
                    w[base + i] = np.float32(q[n, base + i]) * sj + lj
            m = 0
            while m + 4 <= rows:
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for k in range(k_in):
                    wk = w[k]
                    a0 += x[m, k] * wk
                    a1 += x[m + 1, k] * wk
                    a2 += x[m + 2, k] * wk
                    a3 += x[m + 3, k] * wk
                out[m, n] = a0
                out[m + 1, n] = a1
                out[m + 2, n] = a2
                out[m + 3, n] = a3
                m += 4
            for r in range(m, rows):
                acc = np.float32(0.0)
                for k in range(k_in):
                    acc += x[r, k] * w[k]
                out[r, n] = acc
        return out

    return rows_product


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with 8-bit weights; its tensors are non-persistent buffers (no state-dict key):
    an int8 model is for decoding, not for saving."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)  # (N, K) uint8
        self.register_buffer("scales", scales, persistent=False)  # (N, G) fp32
        self.register_buffer("mins", mins, persistent=False)  # (N, G) fp32
        self._views: tuple = ()  # ((the three buffers), (their numpy views)), made on first use

    def _arrays(self) -> tuple[np.ndarray, ...]:
        """numpy views of the buffers (torch -> numpy costs microseconds a call; a decoded token makes 121
        calls), remade whenever a buffer is no longer the tensor they view (module.to(), an assignment)."""
        buffers = (self._buffers["qweight"], self._buffers["scales"], self._buffers["mins"])
        views = getattr(self, "_views", ())
        if not views or any(a is not b for a, b in zip(views[0], buffers)):
            views = (buffers, tuple(t.numpy() for t in buffers))
            self._views = views
        return views[1]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_views": ()}  # a copy's views must be of its own buffers

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8Linear:
        return cls(*quantize(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # autograd wanted (decoding never asks): torch's product keeps the graph
            return x @ self.dequantized().to(x.dtype).t()
        q, scales, mins = self._arrays()
        n, k = q.shape
        rows = np.ascontiguousarray(x.float().numpy().reshape(-1, k))
        if rows.shape[0] > KERNEL_ROWS:  # a long input: numpy's BLAS on the dequantised weight
            out = np.matmul(rows, self.dequantized().numpy().T)
        else:
            with _NUMBA:
                out = product(rows, q, scales, mins)
        return torch.from_numpy(out.reshape(*x.shape[:-1], n))

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) this layer multiplies by."""
        with _NUMBA:
            return torch.from_numpy(_dequantize()(*self._arrays()))

    def extra_repr(self) -> str:
        return f"in_features={self.qweight.shape[1]}, out_features={self.qweight.shape[0]}, int8"
