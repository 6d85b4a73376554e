"""bench/quality.py: the FLOP count it budgets with, its proxies, and its refusal of an over-budget recipe."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from smoltrain.config import load_config

from .conftest import counted_flops_per_token

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_today_is_the_2_5e13_flop_recipe_and_proxies_keep_the_schedule_ratios():
    q = _bench()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", q.RECIPES["today"])
    tokens, flops = q.training_flops(cfg)
    t = cfg.train
    assert tokens == t.max_steps * t.micro_batch_size * t.grad_accum_steps * t.seq_len
    assert flops == tokens * counted_flops_per_token(cfg.model, t.seq_len)
    assert 2.4e13 < flops <= q.BUDGET  # BUDGET is today's compute (2.46e13) rounded up
    cool = load_config(ROOT / "configs" / "quickstart.yaml", q.RECIPES["muon-cool50"])
    proxy = load_config(ROOT / "configs" / "quickstart.yaml", q.scaled(q.RECIPES["muon-cool50"], cool, 0.2))
    assert proxy.train.max_steps == round(0.2 * cool.train.max_steps)
    for name in ("warmup_steps", "decay_start_step"):  # the schedule keeps its shape at a fifth of the steps
        assert getattr(proxy.optim, name) / proxy.train.max_steps == getattr(cool.optim, name) / cool.train.max_steps


def test_an_over_budget_recipe_is_refused_before_training(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--recipes", "today",
                           "--budget", "1e13", "--work", str(tmp_path / "w")], capture_output=True, text=True)
    assert proc.returncode != 0 and "exceed the budget" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_the_shipped_quickstart_trains_the_muon_small_recipe_within_budget():
    """BENCHMARKS.md's muon-small row is the shipped quickstart's training (its eval settings aside)."""
    q = _bench()
    shipped = load_config(ROOT / "configs" / "quickstart.yaml")
    small = load_config(ROOT / "configs" / "quickstart.yaml", q.RECIPES["muon-small"])
    assert (shipped.model, shipped.optim, shipped.train) == (small.model, small.optim, small.train)
    assert q.training_flops(shipped)[1] <= q.BUDGET
