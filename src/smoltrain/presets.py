"""Model shapes (config.py reads them for `model.preset`). SmolLM2 values are those of the released HF config.json files.

The released configs carry rope_theta 1e5 (135M, 360M) / 1.3e5 (1.7B) and 8192 positions: that is the
model *after* SmolLM2's long-context extension. Its pretraining ran at 2048 tokens with rope_theta 1e4;
the GPU recipes in configs/ say which they use.
"""

from __future__ import annotations

from smoltrain.errors import UserError
from smoltrain.model.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, rope_theta=100000.0, initializer_range=0.041666666666666664,
    ),
    "smollm2-360m": ModelConfig(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, rope_theta=100000.0, initializer_range=0.02,
    ),
    "smollm2-1.7b": ModelConfig(  # 32 KV heads: no GQA at this size
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, rope_theta=130000.0, initializer_range=0.02,
    ),
    # For tests: every feature of the real shapes (GQA, tied head) at a size that runs in milliseconds.
    "tiny": ModelConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rope_theta=10000.0,
        initializer_range=0.02,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A copy of a named preset (so callers may change it)."""
    if name not in PRESETS:
        raise UserError(f"Unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name].replace()
