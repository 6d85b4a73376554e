"""The SmolLM2 / Llama architecture: HF `LlamaConfig` field names, read from and written to config.json.

Its own module so that the model, presets and interop use it without the training config (config.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from smoltrain import domain
from smoltrain.domain import build, checked, nonneg, positive
from smoltrain.domain import problems as domain_problems
from smoltrain.errors import UserError


@dataclass
class SamplingConfig:
    """How text is sampled: these defaults are the one set `smoltrain generate`, the demo page and the
    in-training samples (eval.temperature / top_k / top_p) start from. Nucleus sampling over the 50 most
    likely tokens at temperature 0.8 keeps a small model's text readable without greedy's loops."""

    temperature: float = checked(0.8, domain.temperature)
    top_k: int = checked(50, domain.nonneg("off"))
    top_p: float = checked(0.95, domain.top_p)
    # 1.0 = off; HF semantics (divide positive logits, multiply negative)
    repetition_penalty: float = checked(1.0, domain.positive)

    def validate(self) -> None:
        problems = domain_problems(self, "sampling")
        if problems:
            raise UserError("Bad sampling settings: " + "; ".join(problems) + ".")


@dataclass
class ModelConfig:
    """The SmolLM2 / Llama architecture (HF `LlamaConfig` names; defaults are SmolLM2-135M's)."""

    vocab_size: int = checked(49152, positive)
    hidden_size: int = checked(576, positive)
    intermediate_size: int = checked(1536, positive)
    num_hidden_layers: int = checked(30, positive)
    num_attention_heads: int = checked(9, positive)
    num_key_value_heads: int = checked(3, positive)
    max_position_embeddings: int = checked(8192, positive)
    rope_theta: float = checked(100000.0, positive)
    rms_norm_eps: float = checked(1e-5, positive)
    tie_word_embeddings: bool = True
    initializer_range: float = checked(0.041666666666666664, positive)  # nanotron's init_method.std
    bos_token_id: int | None = checked(0, nonneg())
    eos_token_id: int | list[int] | None = checked(0, nonneg())

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> list[str]:
        """All problems with this shape, as messages (empty when fine)."""
        problems = domain_problems(self, "model")
        ids = [i for i in [self.bos_token_id, *eos_ids(self)] if isinstance(i, int)]
        if any(i >= self.vocab_size for i in ids):
            problems.append(f"model.bos_token_id / eos_token_id ({ids}) must be below model.vocab_size "
                            f"({self.vocab_size})")
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
        if not isinstance(hf, dict):
            raise UserError(f"{source} must hold a JSON object, not {type(hf).__name__}.")
        arch = hf.get("model_type")
        if arch != "llama":
            archs = hf.get("architectures") or []
            raise UserError(f"{source} describes a {arch or archs or 'unknown'} model; smoltrain handles "
                            "Llama/SmolLM2 models (model_type 'llama') only.")
        missing = [k for k in HF_REQUIRED if hf.get(k) is None]
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}: a Llama config.json names every one of "
                            f"{', '.join(HF_REQUIRED)}.")
        rope = hf.get("rope_scaling") or {}
        params = hf.get("rope_parameters") or {}
        params = params if isinstance(params, dict) else {"rope_type": params}
        heads = hf["num_attention_heads"]
        kw = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=hf.get("rope_theta", params.get("rope_theta", 10000.0)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        problems: list[str] = []
        cfg = build(cls, kw, "", problems)  # wrong types are named, not raised by the arithmetic below
        problems += cfg.validate()  # a field of the wrong type kept its default: safe to check
        if problems:
            raise UserError(f"{source} has an invalid shape: " + "; ".join(problems) + ".")
        unsupported = []
        if hf.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={hf['hidden_act']}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                unsupported.append(f"{flag}=true")
        if rope or params.get("rope_type", "default") != "default":
            unsupported.append(f"rope scaling {rope or params}")
        if hf.get("head_dim") not in (None, cfg.head_dim):
            unsupported.append(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads")
        if unsupported:
            raise UserError(f"{source} is a Llama variant smoltrain does not implement: {', '.join(unsupported)}.")
        return cfg


# What from_hf cannot default: without these a config.json does not describe a model.
HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def eos_ids(cfg: ModelConfig) -> list[int]:
    """The end-of-sequence ids as a list (HF allows an int or a list)."""
    e = cfg.eos_token_id
    return [] if e is None else [e] if isinstance(e, int) else list(e)

