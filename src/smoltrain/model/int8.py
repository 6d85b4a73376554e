"""Weight-only 8-bit decoding of a SmolLM2 on the CPU: every projection and the LM head as an Int8Linear
(model/int8_linear.py: the format, why 32-weight blocks with a minimum, the numba kernel, measured),
q/k/v and gate/up fused. The embedding lookup stays fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from smoltrain.model.int8_linear import Int8Linear
from smoltrain.model.llama import SmolLM2


def supported(device: torch.device | str) -> bool:
    """int8 decoding runs where its kernel does: on the CPU."""
    return torch.device(device).type == "cpu"


def _fuse(linears: list[nn.Module]) -> tuple[Int8Linear, list[Int8Linear]]:
    """One int8 product for several projections of the same input, and each part as a row-slice view of
    it (same values, no extra memory) to put in place of the fp32 projection."""
    fused = Int8Linear.of(torch.cat([lin.weight for lin in linears]))
    parts = []
    lo = 0
    for lin in linears:
        hi = lo + lin.weight.shape[0]
        parts.append(Int8Linear(fused.qweight[lo:hi], fused.scales[lo:hi], fused.mins[lo:hi]))
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
