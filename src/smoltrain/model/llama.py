"""SmolLM2: the Llama decoder exactly as transformers' LlamaForCausalLM computes it, with its parameter names.

Shape legend: B batch, T sequence (this call), S cache length, D hidden_size, H query heads,
K key/value heads, E head_dim (D / H), F intermediate_size, V vocab_size.

Build on the meta device, then either `init_weights()` (fresh training) or
`load_state_dict(..., assign=True)` followed by `init_rope()` (loaded weights): no memory is spent on
random weights that are about to be overwritten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smoltrain.model import blas
from smoltrain.model.config import ModelConfig
from smoltrain.model.loss import auto_chunk, chunked_cross_entropy

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as HF LlamaRMSNorm does (bf16 statistics lose precision)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; on CPU in fp32 it equals HF's formula bit for bit
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_cache(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (max_position_embeddings, E) for rotate-half RoPE, in fp32 like HF.

    HF rotates with rotate_half(x) = cat(-x2, x1); the sign lives in the table instead (its first half is
    -sin), so the rotation is one roll: rotate_half(x) * sin == x.roll(E/2) * signed_sin, exactly.
    """
    e = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.int64, device=device).float() / e))
    pos = torch.arange(cfg.max_position_embeddings, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # (P, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, E): rotate-half layout, not interleaved
    sin = emb.sin()
    sin[:, : e // 2].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, h, E); cos/sin (T, 1, E) already gathered for these positions; sin is signed (rope_cache)
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class LayerKV:
    """One layer's preallocated keys and values (B, K, S, E), written in place at the given slots."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """A generation's own KV cache, passed through hidden_states (gpt-fast style): the model holds no
    per-generation state, so concurrent generations on one model never share a cache."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.layers = [LayerKV(shape, dtype, device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        e = cfg.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = e
        self.q_proj = nn.Linear(d, self.num_heads * e, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * e, bias=False)
        self.o_proj = nn.Linear(self.num_heads * e, d, bias=False)
        # q, k and v as one product (D -> H*E + 2*K*E), inference only (to_inference_layout, int8.to_int8)
        self.fused_qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                kv: LayerKV | None = None, start: int = 0) -> torch.Tensor:
        """mask: a boolean attention mask (T, S) or (B, 1, T, S); None is causal over this call's keys
        (a single query token sees every key). kv: this layer's cache, written at slots start..start+T."""
        b, t, _ = x.shape
        h = self.num_heads
        kh = self.num_kv_heads
        e = self.head_dim
        if self.fused_qkv is not None:  # inference: one matmul, and RoPE on q and k together
            qkv = self.fused_qkv(x).view(b, t, h + 2 * kh, e)  # (B, T, H+2K, E)
            qk = apply_rope(qkv[:, :, : h + kh], cos, sin)  # (B, T, H+K, E)
            q = qk[:, :, :h]
            k = qk[:, :, h:]
            v = qkv[:, :, h + kh :]
        else:
            q = apply_rope(self.q_proj(x).view(b, t, h, e), cos, sin)  # (B, T, H, E)
            k = apply_rope(self.k_proj(x).view(b, t, kh, e), cos, sin)  # (B, T, K, E)
            v = self.v_proj(x).view(b, t, kh, e)  # (B, T, K, E)
        q = q.transpose(1, 2)  # (B, h, T, E)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        if kv is not None:
            k, v = kv.update(start, k, v)  # (B, K, S, E) with S = start + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                           enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, E)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused_gate_up: nn.Module | None = None  # D -> 2F, as fused_qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, kv=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `LlamaModel`: the `model.` prefix of every parameter name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # an uninitialised weight (init_weights or a state dict fills it): nn.Embedding's own N(0, 1) init would
        # be thrown away, and on the meta device that every build uses it imports torch._dynamo, 2-3 s of
        # every command that loads a model
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SmolLM2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = cfg.validate()
        assert not problems, problems
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights, nanotron's StandardParametrizator: N(0, std) for embeddings and input-side
        projections, N(0, std / sqrt(2 * num_layers)) for the projections that write into the residual
        stream (o_proj, down_proj), ones for the norms. std is `initializer_range` (init_method.std)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        self.init_rope()

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables on the model's device; they are not part of the state dict."""
        device = self.model.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = rope_cache(self.config, device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once

    def new_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for one generation of `batch` rows and up to `max_len` positions."""
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or w.dtype, w.device)

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int | None = None, cache: KVCache | None = None,
                      pad: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states (B, T, D).

        With a `cache`, input_ids[:, 0] goes to cache slot `start_pos` (a host int: no device sync per
        layer). `pad` (B,) counts the left-padding slots of each row (batched prompts of different
        lengths): a row's positions start after its padding and no query attends to a padding slot.
        """
        t = input_ids.shape[1]
        s = start_pos or 0
        mask = None
        if pad is not None:
            slots = torch.arange(s + t, device=input_ids.device)
            # (B, T); clamped: a finished row is fed on (discarded) while longer rows decode past its context
            pos = (slots[s:][None] - pad[:, None]).clamp(0, self.rope_cos.shape[0] - 1)
            cos = self.rope_cos[pos][:, :, None]  # (B, T, 1, E)
            sin = self.rope_sin[pos][:, :, None]
            keys = slots[None, None, :]
            queries = slots[None, s:, None]
            # causal and off the padding; a padding query sees itself, so its (unused) row stays finite
            mask = ((keys <= queries) & (keys >= pad[:, None, None])) | (keys == queries)  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
        else:
            cos = self.rope_cos[s : s + t, None]  # (T, 1, E)
            sin = self.rope_sin[s : s + t, None]
            if cache is not None and s > 0 and t > 1:  # a chunk after an existing prefix: explicit causal mask
                rows = torch.arange(s, s + t, device=input_ids.device)[:, None]
                mask = torch.arange(s + t, device=input_ids.device)[None, :] <= rows  # (T, S)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.model.layers):
            kv = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv, s, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv, s)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, start_pos: int | None = None,
                loss_chunk: int | str = 0, reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) when `labels` is None, else the cross-entropy loss over labels != -100.

        labels are already aligned with input_ids (labels[t] is the token after input_ids[t]).
        loss_chunk > 0 computes the loss `loss_chunk` tokens at a time without ever holding the full
        (B*T, V) logits (see loss.py); the result equals the plain loss up to summation order. "auto" picks
        the chunk for the shape and device (loss.auto_chunk).
        """
        h = self.hidden_states(input_ids, start_pos)
        if labels is None:
            return self.lm_head(h)
        if loss_chunk == "auto":
            loss_chunk = auto_chunk(h.shape[0] * h.shape[1], self.config.vocab_size, h.device)
        if loss_chunk > 0:
            return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                         loss_chunk, IGNORE_INDEX, reduction)
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)


class KMajorLinear(nn.Module):
    """Inference stand-in for a bias-free nn.Linear: same `weight` (out, in) values and state-dict key, but
    backed by a k-major (in, out) contiguous tensor, multiplied through numpy's BLAS on CPU (blas.py).
    A fused product (q/k/v, gate/up) holds its weight as a non-persistent buffer: no state-dict key."""

    def __init__(self, weight: torch.Tensor, persistent: bool = True):
        super().__init__()
        # (out, in), the transpose of a contiguous (in, out) tensor; shared where tied
        if persistent:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        else:
            self.register_buffer("weight", weight, persistent=False)

    @property
    def weight_km(self) -> torch.Tensor:
        return self.weight.t()  # (in, out), contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blas.matmul(x, self.weight_km)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, k-major"


@torch.no_grad()
def to_inference_layout(model: SmolLM2) -> SmolLM2:
    """Inference only: every projection k-major, q/k/v and gate/up fused into one matmul each.

    Batch-1 decoding streams all weights through one matrix-vector product per projection; stored
    k-major (the transpose contiguous, viewed back as (out, in)) those read memory sequentially, on
    CPU through OpenBLAS (blas.py), and fusing saves dispatches. Weight values and state_dict() keys
    are unchanged; logits change only in summation order (~1e-7), so greedy tokens match unless two
    logits tie. Apply it last: load weights before (a later load_state_dict would miss the fused
    copies). The model is frozen; do not train it afterwards.
    """
    def kmajor(w: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(w.t().contiguous().t(), requires_grad=False)

    def fuse(linears: list[nn.Linear]) -> torch.Tensor:
        fused = torch.cat([lin.weight for lin in linears]).t().contiguous()  # (in, sum of outs)
        lo = 0
        for lin in linears:
            hi = lo + lin.out_features
            lin.weight = nn.Parameter(fused[:, lo:hi].t(), requires_grad=False)
            lo = hi
        return fused

    for layer in model.model.layers:
        a = layer.self_attn
        m = layer.mlp
        a.fused_qkv = KMajorLinear(fuse([a.q_proj, a.k_proj, a.v_proj]).t(), persistent=False)
        m.fused_gate_up = KMajorLinear(fuse([m.gate_proj, m.up_proj]).t(), persistent=False)
        a.o_proj = KMajorLinear(kmajor(a.o_proj.weight))
        m.down_proj = KMajorLinear(kmajor(m.down_proj.weight))
    emb = model.model.embed_tokens
    emb.weight = kmajor(emb.weight)
    head = emb.weight if model.config.tie_word_embeddings else kmajor(model.lm_head.weight)
    model.lm_head = KMajorLinear(head)
    return model.requires_grad_(False)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", init: bool = True) -> SmolLM2:
    """A model on `device`; built on meta first so the weights are materialised once."""
    with torch.device("meta"):
        model = SmolLM2(cfg)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty keeps the tie, but be explicit: it is the contract
        model.lm_head.weight = model.model.embed_tokens.weight
    if init:
        model.init_weights()
    else:
        model.init_rope()
    return model
