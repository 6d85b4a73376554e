"""Configuration dataclasses. Field names follow Hugging Face's LlamaConfig wherever one exists."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from smoltrain.errors import UserError


@dataclass
class ModelConfig:
    """The SmolLM2 / Llama architecture (HF `LlamaConfig` names; defaults are SmolLM2-135M's)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.041666666666666664  # nanotron's init_method.std
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> list[str]:
        """All problems with this shape, as messages (empty when fine)."""
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name} must be positive (got {getattr(self, name)})")
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            problems.append(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                            f"model.num_attention_heads ({self.num_attention_heads})")
        elif self.num_attention_heads > 0 and self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even for RoPE")
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"model.num_key_value_heads ({self.num_key_value_heads})")
        return problems

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' LlamaForCausalLM loads."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
            head_dim=self.head_dim, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
            rope_scaling=None, pretraining_tp=1, use_cache=True, torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> ModelConfig:
        """Read a transformers Llama config dict; anything that is not plain SmolLM2/Llama is an error."""
        arch = hf.get("model_type")
        if arch != "llama":
            archs = hf.get("architectures") or []
            raise UserError(f"{source} describes a {arch or archs or 'unknown'} model; smoltrain handles "
                            "Llama/SmolLM2 models (model_type 'llama') only.")
        unsupported = []
        if hf.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={hf['hidden_act']}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                unsupported.append(f"{flag}=true")
        rope = hf.get("rope_scaling") or {}
        params = hf.get("rope_parameters") or {}
        if rope or params.get("rope_type", "default") != "default":
            unsupported.append(f"rope scaling {rope or params}")
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            unsupported.append(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads")
        if unsupported:
            raise UserError(f"{source} is a Llama variant smoltrain does not implement: {', '.join(unsupported)}.")
        theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
        kw = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        cfg = cls(**kw)
        problems = cfg.validate()
        if problems:
            raise UserError(f"{source} has an invalid shape: " + "; ".join(problems) + ".")
        return cfg


def eos_ids(cfg: ModelConfig) -> list[int]:
    """The end-of-sequence ids as a list (HF allows an int or a list)."""
    e = cfg.eos_token_id
    return [] if e is None else [e] if isinstance(e, int) else list(e)



