"""FLOPs per token (PaLM convention, GQA and tied head counted right), MFU and log rewinding."""

from __future__ import annotations

import json

import torch

from smoltrain.config import ModelConfig
from smoltrain.presets import get_preset
from smoltrain.train.runlog import flops_per_token, model_flops_utilization, rewind_jsonl

from .conftest import counted_flops_per_token


def test_flops_per_token_counts_gqa_and_head_once():
    issue6 = ModelConfig(vocab_size=49152, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2)  # the CPU shape of issue 6
    for cfg in [issue6, *(get_preset(n) for n in ("smollm2-135m", "smollm2-360m", "smollm2-1.7b"))]:
        for tied in (True, False):
            cfg = cfg.replace(tie_word_embeddings=tied)
            for seq_len in (256, 2048):
                assert flops_per_token(cfg, seq_len) == counted_flops_per_token(cfg, seq_len)


def test_mfu_is_none_without_a_known_peak():
    cfg = get_preset("tiny")
    assert model_flops_utilization(cfg, 128, 1e6, torch.device("cpu"), torch.float32) is None


def test_rewind_keeps_history_up_to_the_resumed_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    rewind_jsonl(p, 5)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2, 3, 4, 5]
