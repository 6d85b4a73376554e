"""CPU matrix products for inference through numpy's BLAS instead of the one torch calls.

torch's CPU wheels call Intel MKL, which takes slow generic paths on non-Intel CPUs; numpy's wheels
carry OpenBLAS (Accelerate on macOS), tuned per microarchitecture. On the 2-core AMD EPYC of
BENCHMARKS.md, OpenBLAS runs the decode matrix-vector products ~1.5x faster (19.5 vs 13 GB/s of
weights); on Intel CPUs both should stream near memory bandwidth (not measured). Same math, another
summation order. Used for inference (decode) only: in training the two libraries' thread pools spin
against each other between calls and the gain was a wash. OpenBLAS uses every core and ignores
torch.set_num_threads; cap it with OPENBLAS_NUM_THREADS where several processes share a machine.
"""

from __future__ import annotations

import numpy as np
import torch


def usable(*tensors: torch.Tensor) -> bool:
    """True when numpy may compute on these tensors: fp32, on the CPU, no autograd history wanted."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (K, N), through numpy when `usable`: the leading dimensions flattened into one
    product; any strides for x and w."""
    if not usable(x, w):
        return x @ w
    y = np.matmul(x.reshape(-1, x.shape[-1]).numpy(), w.numpy())  # (M, N), a fresh C-contiguous array
    return torch.from_numpy(y).view(*x.shape[:-1], w.shape[1])
