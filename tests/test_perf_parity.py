"""Throughput work must not change the math: smoltrain's step == a plain transformers loop, 5 steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from smoltrain.config import OptimConfig
from smoltrain.model.llama import build_model
from smoltrain.presets import get_preset
from smoltrain.train.optim import build_optimizer


def test_optimised_step_equals_plain_loop_for_5_steps():
    cfg = get_preset("tiny").replace(vocab_size=1024)
    torch.manual_seed(0)
    ours = build_model(cfg).train()
    plain = LlamaForCausalLM(LlamaConfig(**cfg.to_hf())).train()
    plain.load_state_dict(ours.state_dict())
    opt_ours = build_optimizer(ours, OptimConfig(lr=3e-3, weight_decay=0.01, no_decay_norms_and_embeddings=False),
                               torch.device("cpu"))
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        w = torch.randint(0, cfg.vocab_size, (4, 65), generator=g)
        x, y = w[:, :-1], w[:, 1:]
        a = ours(x, labels=y, loss_chunk=100)  # chunked fused head + loss, 3 chunks
        a.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt_ours.step()
        opt_ours.zero_grad()
        logits = plain(input_ids=x).logits
        b = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.reshape(-1))
        b.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad()
        assert abs(a.item() - b.item()) < 1e-5
