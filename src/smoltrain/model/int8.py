"""Weight-only int8 for CPU decoding: int8 weights with one fp32 scale per output channel, fp32 activations.

Why: decoding one token at a time streams every weight once per token, so its speed on a CPU is bytes of
weights / memory bandwidth. int8 weights are a quarter of fp32's bytes (for SmolLM2-135M: 134 MB per token
instead of 538 MB). The product is torch's own CPU kernel `aten._weight_int8pack_mm` (x (M, K) fp32 @
int8 w (N, K)^T, times scales (N,)): it widens the int8 weights in registers, so no fp32 copy is ever
written back to memory. torchao's int8 weight-only layout on CPU either reaches the same kernel (compiled)
or dequantises to fp32 per call (eager), so it would add a dependency and a tensor subclass for nothing.
Where it pays: the kernel is vectorised for AVX-512 (and ARM); on an AVX2-only x86 CPU it ran at ~1 GMAC/s
(BENCHMARKS.md), slower than the fp32 products.

Symmetric per-row quantisation: scale = max |w_row| / 127, q = round(w / scale) in [-127, 127]. A fused
product (q/k/v, gate/up) quantises the same rows as its parts would, so fusing changes nothing.
The embedding stays fp32: a lookup reads one row per token. The tied LM head gets its own int8 copy.
"""

from __future__ import annotations

import torch
from torch import nn

from smoltrain.model.llama import SmolLM2


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K), fp32 scales (N,)) of a weight (N, K): per output channel, symmetric."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps a finite scale
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def supported(device: torch.device | str) -> bool:
    """int8 decoding runs where torch's weight-only int8 kernel does: on the CPU."""
    return torch.device(device).type == "cpu"


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights; its tensors are non-persistent buffers (no state-dict key):
    an int8 model is for decoding, not for saving."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)  # (N, K) int8
        self.register_buffer("scales", scales, persistent=False)  # (N,) fp32

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8Linear:
        return cls(*quantize(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.qweight.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, k).contiguous(), self.qweight, self.scales)  # (M, N)
        return y.view(*x.shape[:-1], n)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) this layer multiplies by."""
        return self.qweight.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.qweight.shape[1]}, out_features={self.qweight.shape[0]}, int8"


def _fuse(linears: list[nn.Module]) -> tuple[Int8Linear, list[Int8Linear]]:
    """One int8 product for several projections of the same input, and each part as a row-slice view of
    it (same values, no extra memory) to put in place of the fp32 projection."""
    fused = Int8Linear.of(torch.cat([lin.weight for lin in linears]))
    parts = []
    lo = 0
    for lin in linears:
        hi = lo + lin.weight.shape[0]
        parts.append(Int8Linear(fused.qweight[lo:hi], fused.scales[lo:hi]))
        lo = hi
    return fused, parts


@torch.no_grad()
def to_int8(model: SmolLM2) -> SmolLM2:
    """Decode-only: every projection and the LM head as int8 (q/k/v and gate/up fused), on a CPU model
    with its weights loaded (as from load_model; not after to_inference_layout). The fp32 projection
    weights are released; the model is frozen."""
    for layer in model.model.layers:
        a = layer.self_attn
        m = layer.mlp
        a.fused_qkv, (a.q_proj, a.k_proj, a.v_proj) = _fuse([a.q_proj, a.k_proj, a.v_proj])
        m.fused_gate_up, (m.gate_proj, m.up_proj) = _fuse([m.gate_proj, m.up_proj])
        a.o_proj = Int8Linear.of(a.o_proj.weight)
        m.down_proj = Int8Linear.of(m.down_proj.weight)
    model.lm_head = Int8Linear.of(model.lm_head.weight)  # tied or not: the embedding lookup stays fp32
    return model.requires_grad_(False)
