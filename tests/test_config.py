"""Config: recipes parse, overrides apply, and every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from smoltrain.checkpoint.resume import trajectory_diff
from smoltrain.config import load_config
from smoltrain.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_recipe_parses(path):
    cfg = load_config(path)
    assert cfg.train.seq_len <= cfg.model.max_position_embeddings


def test_overrides_and_presets():
    cfg = load_config(None, ["model.preset=smollm2-360m", "train.max_steps=7", "optim.lr=1e-4",
                             "data.datasets=[{name: a, sources: [x.txt]}]"])
    assert cfg.model.hidden_size == 960 and cfg.train.max_steps == 7 and cfg.optim.lr == 1e-4
    assert cfg.data.datasets[0].sources == ["x.txt"]


def test_all_problems_in_one_message(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(None, ["train.max_stepz=5", "optim.lr=fast", "train.seq_len=100000", "train.micro_batch_size=0"])
    msg = str(e.value)
    for needle in ("unknown key 'train.max_stepz'", "optim.lr must be float, got 'fast'",
                   "train.seq_len (100000) exceeds model.max_position_embeddings (8192)",
                   "train.micro_batch_size must be > 0 (got 0)"):
        assert needle in msg, (needle, msg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(UserError, match="Malformed YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="must be one of"):
        load_config(None, ["optim.schedule=exponential"])
    with pytest.raises(UserError, match="bool"):
        load_config(None, ["train.compile=maybe"])


def test_global_batch_makes_a_new_config():
    """train.global_batch_size sets the accumulation of the config that runs; the resolved one is kept."""
    from smoltrain.train.setup import with_global_batch

    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    two = with_global_batch(cfg, world_size=2)
    assert two.train.grad_accum_steps == 2 and with_global_batch(cfg, world_size=1).train.grad_accum_steps == 4
    assert cfg.train.grad_accum_steps == 1 and two.train is not cfg.train
    with pytest.raises(UserError, match="not divisible"):
        with_global_batch(cfg, world_size=3)


def test_trajectory_diff_names_fields():
    a = load_config(None).to_dict()
    b = load_config(None, ["train.seed=1", "model.hidden_size=64", "model.num_attention_heads=4",
                           "model.num_key_value_heads=2", "optim.lr=1e-4"]).to_dict()
    diffs = trajectory_diff(a, b)
    assert any(d.startswith("train.seed") for d in diffs)
    assert any(d.startswith("model.hidden_size") for d in diffs)
    assert not any(d.startswith("optim") for d in diffs)  # lr changes are allowed (e.g. a WSD cooldown)
