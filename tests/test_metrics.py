"""FLOPs per token (PaLM convention, GQA and tied head counted right), MFU and log rewinding."""

from __future__ import annotations

import json

import torch

from smoltrain.config import ModelConfig
from smoltrain.model.llama import SmolLM2
from smoltrain.presets import get_preset
from smoltrain.train.runlog import flops_per_token, model_flops_utilization, rewind_jsonl


def _matmul_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = SmolLM2(cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # a lookup: no FLOPs
    return model.num_params() - norms - embedding


def test_flops_per_token_counts_gqa_and_head_once():
    for name in ("smollm2-135m", "smollm2-360m", "smollm2-1.7b"):
        for tied in (True, False):
            cfg = get_preset(name).replace(tie_word_embeddings=tied)
            attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 2048
            assert flops_per_token(cfg, 2048) == 6 * _matmul_params(cfg) + attn


def test_issue6_cpu_shape_is_74_mflop_per_token():
    cfg = ModelConfig(vocab_size=49152, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=2)
    assert round(flops_per_token(cfg, 256) / 1e6, 1) == 74.3


def test_mfu_is_none_without_a_known_peak():
    cfg = get_preset("tiny")
    assert model_flops_utilization(cfg, 128, 1e6, torch.device("cpu"), torch.float32) is None


def test_rewind_keeps_history_up_to_the_resumed_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    rewind_jsonl(p, 5)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3, 4, 5]
