"""Schedules and parameter groups."""

from __future__ import annotations

import pytest

from smoltrain.config import OptimConfig
from smoltrain.model.llama import build_model
from smoltrain.presets import get_preset
from smoltrain.train.optim import lr_at, param_groups


def test_warmup_then_wsd_like_nanotron():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, schedule="wsd", warmup_steps=10, decay_start_step=80, decay_steps=20)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable phase
    assert lrs[80] == pytest.approx(0.95) and lrs[99] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_wsd_defaults_decay_last_20_percent_and_extension():
    cfg = OptimConfig(lr=1.0, schedule="wsd")
    assert lr_at(79, cfg, 100) == 1.0 and lr_at(99, cfg, 100) == pytest.approx(0.0)
    # a cooldown branched at step 60 of a stable run: decay over 10 steps from there
    branch = OptimConfig(lr=1.0, schedule="wsd", decay_start_step=60, decay_steps=10)
    assert lr_at(59, branch, 70) == 1.0 and lr_at(69, branch, 70) == pytest.approx(0.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decays_reach_min_lr(schedule):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, schedule=schedule, warmup_steps=5)
    assert lr_at(4, cfg, 50) == pytest.approx(1.0)
    assert lr_at(49, cfg, 50) == pytest.approx(0.1)
    assert 0.1 < lr_at(27, cfg, 50) < 1.0


def test_param_groups_exclude_norms_and_embeddings():
    model = build_model(get_preset("tiny"))
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.model.embed_tokens.weight) not in decayed
    assert id(model.model.norm.weight) not in decayed
    assert id(model.model.layers[0].mlp.up_proj.weight) in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    flat = param_groups(model, OptimConfig(weight_decay=0.1, no_decay_norms_and_embeddings=False))
    assert len(flat) == 1


def test_muon_takes_hidden_matrices_and_the_schedule_scales_both_groups():
    import torch

    from smoltrain.train.optim import build_optimizer, set_lr

    model = build_model(get_preset("tiny"))
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.05)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    muon = {id(p) for g in opt.param_groups if g.get("muon") for p in g["params"]}
    assert id(model.model.layers[0].self_attn.q_proj.weight) in muon
    assert id(model.model.layers[1].mlp.down_proj.weight) in muon
    assert id(model.model.embed_tokens.weight) not in muon  # the tied embedding/head stays with AdamW
    assert id(model.model.norm.weight) not in muon
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in opt.param_groups if g.get("muon")] == [0.05]
    set_lr(opt, 5e-4, cfg)  # half of the peak: both groups at half their peak
    assert sorted(g["lr"] for g in opt.param_groups) == [5e-4, 0.01]


def test_muon_state_dict_is_plain_tensors_and_round_trips():
    import copy

    import torch

    from smoltrain.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    cfg = OptimConfig(name="muon")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))

    def step(m, o):
        m(ids).float().pow(2).mean().backward()
        o.step()
        o.zero_grad()

    step(model, opt)
    sd = opt.state_dict()
    assert all(torch.is_tensor(v) for s in sd["state"].values() for v in s.values())
    assert {k for s in sd["state"].values() for k in s} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(twin, cfg, torch.device("cpu"))
    twin_opt.load_state_dict(copy.deepcopy(sd))
    step(model, opt)
    step(twin, twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_cpu_muon_is_torchs_muon_with_an_fp32_newton_schulz(adjust):
    """In bf16 CpuMuon's update is torch.optim.Muon's bit for bit (so the rest of the step is torch's); in
    fp32 (what CPU runs use) it is the same update to bf16's precision, and its state loads into torch's."""
    import copy

    import torch

    from smoltrain.train.optim import CpuMuon

    class Bf16Muon(CpuMuon):
        ns_dtype = torch.bfloat16

    torch.manual_seed(0)
    weights = [torch.randn(96, 32), torch.randn(32, 80)]  # a tall and a wide matrix (the former is transposed)
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(cls):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = cls(params, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn=adjust)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    ref, _ = run(torch.optim.Muon)
    same, _ = run(Bf16Muon)
    assert all(torch.equal(a, b) for a, b in zip(ref, same))
    fp32, fp32_opt = run(CpuMuon)
    moved = [(a - w).norm() for a, w in zip(ref, weights)]
    gaps = [(a - b).norm() / m for a, b, m in zip(ref, fp32, moved)]
    assert all(0 < g < 0.02 for g in gaps), gaps  # differs (it is fp32), by bf16's rounding only
    twin = [torch.nn.Parameter(p.detach().clone()) for p in fp32]
    torch_opt = torch.optim.Muon(twin, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, adjust_lr_fn=adjust)
    torch_opt.load_state_dict(copy.deepcopy(fp32_opt.state_dict()))
    assert all(torch.equal(torch_opt.state[t]["momentum_buffer"], fp32_opt.state[p]["momentum_buffer"])
               for t, p in zip(twin, fp32))
