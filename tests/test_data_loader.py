"""PackedLoader: packing, determinism, mixtures with stages, rank sharding, exact resume, validation passes.

Most tests use synthetic prepared directories whose tokens are their own positions (source a: 0, 1, 2, ...;
source b: 30000, 30001, ...), so every window says where it came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smoltrain.data.loader import PackedLoader, check_vocab, eval_windows, ordered_batches
from smoltrain.data.prepare import prepare
from smoltrain.data.shards import META_FORMAT, VERSION, ShardWriter
from smoltrain.errors import UserError

from .conftest import make_corpus_text

T = 16


def fake_prepared(path, train: np.ndarray, val: np.ndarray | None = None, shard_tokens: int = 1000,
                  sha: str = "fake") -> str:
    """A prepared directory with exactly these tokens (as `prepare` would lay it out)."""
    path.mkdir(parents=True)
    splits = {}
    for name, tokens in (("train", train), ("val", val if val is not None else np.zeros(0))):
        w = ShardWriter(path, name, np.dtype("<u2"), shard_tokens)
        w.write(tokens, 1)
        shards = w.close()
        splits[name] = {"num_tokens": len(tokens), "num_documents": 1, "shards": shards}
    meta = {"format": META_FORMAT, "version": VERSION, "num_tokens": len(train), "num_documents": 2,
            "tokenizer": {"source": "fake", "sha256": sha, "vocab_size": 65536}, "vocab_size": 65536,
            "eot_id": 0, "dtype": "uint16", "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta))
    return str(path)


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    a = fake_prepared(root / "a", np.arange(0, 16 * 64 + 1), val=np.arange(20000, 20000 + 16 * 20 + 1))
    b = fake_prepared(root / "b", np.arange(30000, 30000 + 16 * 24 + 1), val=np.arange(40000, 40000 + 16 * 9 + 1))
    return {"a": a, "b": b}


def source_of(batch: torch.Tensor) -> list[str]:
    return ["a" if row[0] < 30000 else "b" for row in batch]


def take(loader: PackedLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_stream_slices_and_an_epoch_visits_each_once(ab):
    loader = PackedLoader({"a": ab["a"]}, batch_size=4, seq_len=T, seed=0)  # 64 windows, shards of 1000 tokens
    starts = []
    for batch in take(loader, 16):
        assert batch.shape == (4, T + 1) and batch.dtype == torch.int64
        for row in batch:
            assert row[0] % T == 0 and torch.equal(row, torch.arange(row[0], row[0] + T + 1))  # across shards too
            starts.append(int(row[0]))
    assert sorted(starts) == list(range(0, 64 * T, T))
    assert starts != sorted(starts)  # shuffled
    second = [int(r[0]) for b in take(loader, 16) for r in b]
    assert sorted(second) == sorted(starts) and second != starts  # a new order each epoch
    assert loader.state_dict()["cursors"] == {"a": [2, 0]}  # (epoch, window): two whole passes served


def test_deterministic_for_a_seed_and_independent_of_global_rng(ab):
    torch.manual_seed(1)
    np.random.seed(1)
    first = take(PackedLoader(ab, 4, T, seed=3), 6)
    torch.manual_seed(99)
    np.random.seed(99)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    second = take(PackedLoader(ab, 4, T, seed=3), 6)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert torch.equal(before[0], torch.get_rng_state())  # it never draws from the global generators
    assert (before[1] == np.random.get_state()[1]).all()
    other = take(PackedLoader(ab, 4, T, seed=4), 6)
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_mixture_weights_change_at_stage_boundaries(ab):
    stages = [{"start_step": 0, "weights": {"a": 0.75, "b": 0.25}}, {"start_step": 10, "weights": {"b": 1.0}}]
    loader = PackedLoader(ab, batch_size=8, seq_len=T, seed=0, stages=stages)
    early = [s for b in take(loader, 10) for s in source_of(b)]
    assert 0.6 < early.count("a") / len(early) < 0.9
    late = [s for b in take(loader, 5) for s in source_of(b)]
    assert late == ["b"] * 40  # b has 24 windows: the stage wraps it into a new epoch
    assert loader.tokens_per_source == {"a": early.count("a") * T, "b": (early.count("b") + 40) * T}
    assert loader.weights_at(9) == {"a": 0.75, "b": 0.25} and loader.weights_at(10) == {"a": 0.0, "b": 1.0}


def test_ranks_and_accumulation_see_the_same_global_batch(ab):
    stages = [{"start_step": 0, "weights": {"a": 1, "b": 1}}, {"start_step": 3, "weights": {"a": 1, "b": 3}}]
    kw = dict(seq_len=T, seed=7, stages=stages)
    single = PackedLoader(ab, batch_size=8, **kw)
    ranks = [PackedLoader(ab, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    accum = PackedLoader(ab, batch_size=4, grad_accum_steps=2, **kw)
    quad = [PackedLoader(ab, batch_size=2, rank=r, world_size=2, grad_accum_steps=2, **kw) for r in range(2)]
    for _ in range(8):  # optimizer steps, across the stage change
        want = single.next_batch()
        assert torch.equal(torch.cat([r.next_batch() for r in ranks]), want)  # union over ranks
        assert torch.equal(torch.cat([accum.next_batch(), accum.next_batch()]), want)
        micro = [[q.next_batch() for q in quad] for _ in range(2)]  # (micro, rank)
        assert torch.equal(torch.cat([x for m in micro for x in m]), want)
    assert ranks[0].tokens_per_source == ranks[1].tokens_per_source == single.tokens_per_source


@pytest.mark.parametrize("stop_after", [3, 8, 13])  # mid-step, at a step boundary, after the stage change
def test_resume_yields_exactly_the_uninterrupted_batches(ab, stop_after):
    stages = [{"start_step": 0, "weights": {"a": 0.5, "b": 0.5}}, {"start_step": 4, "weights": {"a": 0.2, "b": 0.8}}]
    make = lambda r: PackedLoader(ab, 3, T, seed=11, stages=stages, rank=r, world_size=2,  # noqa: E731
                                  grad_accum_steps=2)
    full = [make(r) for r in range(2)]
    want = [take(loader, 30) for loader in full]
    interrupted = [make(r) for r in range(2)]
    for loader in interrupted:
        take(loader, stop_after)
    state = json.loads(json.dumps(interrupted[0].state_dict()))  # through a checkpoint file; rank 0's only
    assert state == interrupted[1].state_dict()  # every rank holds the same state
    resumed = [make(r) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(state)
    for r in range(2):
        got = take(resumed[r], 30 - stop_after)
        assert all(torch.equal(x, y) for x, y in zip(got, want[r][stop_after:]))
        assert resumed[r].tokens_per_source == full[r].tokens_per_source
        assert resumed[r].state_dict() == full[r].state_dict()


def test_state_from_other_settings_is_refused(ab):
    state = PackedLoader(ab, 4, T, seed=0).state_dict()
    with pytest.raises(UserError, match="seq_len"):
        PackedLoader(ab, 4, 8, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        PackedLoader(ab, 4, T, seed=1).load_state_dict(state)


def test_bad_configurations_are_user_errors(ab, tmp_path):
    with pytest.raises(UserError, match=r"b \(.*\) has 385 tokens, that is 24 windows .* needs 32 windows"):
        PackedLoader(ab, batch_size=16, seq_len=T, world_size=2)
    with pytest.raises(UserError, match="unknown dataset"):
        PackedLoader(ab, 4, T, weights={"a": 1, "c": 1})
    with pytest.raises(UserError, match="non-negative"):
        PackedLoader(ab, 4, T, stages=[{"start_step": 0, "weights": {"a": -1, "b": 1}}])
    with pytest.raises(UserError, match="increasing"):
        PackedLoader(ab, 4, T, stages=[{"start_step": 5, "weights": {"a": 1}}, {"start_step": 5, "weights": {"b": 1}}])
    with pytest.raises(UserError, match="no 'test' split"):
        PackedLoader(ab, 4, T, split="test")
    other = fake_prepared(tmp_path / "c", np.arange(1000), sha="other")
    with pytest.raises(UserError, match="different tokenizers"):
        PackedLoader({"a": ab["a"], "c": other}, 4, T)
    with pytest.raises(UserError, match="not a prepared dataset"):
        PackedLoader({"x": tmp_path}, 4, T)


def test_validation_pass_is_deterministic_finite_and_rank_sharded(ab):
    sources = PackedLoader(ab, batch_size=4, seq_len=T, split="val").sources  # a: 20 windows, b: 9 windows
    first = list(ordered_batches(sources, 4))
    assert len(first) == 29 // 4 and all(torch.equal(x, y) for x, y in zip(first, ordered_batches(sources, 4)))
    stream = torch.cat(first)
    assert stream[0, 0] == 20000 and stream[20, 0] == 40000  # stored order: a, then b
    assert len(list(ordered_batches(sources, 4, max_batches=2))) == 2
    assert [int(b[0, 0]) for b in ordered_batches(sources[1:], 4)] == [40000, 40000 + 4 * T]
    pairs = zip(*(ordered_batches(sources, 2, rank=r, world_size=2) for r in range(2)))
    assert torch.equal(torch.cat([torch.cat(p) for p in pairs]), stream)
    windows = list(eval_windows(ab["b"], "val", T, 4))
    assert [len(w) for w in windows] == [4, 4, 1]  # a shorter last batch covers the rest


def test_check_vocab(ab):
    loader = PackedLoader(ab, 4, T)
    check_vocab(loader, 65536)
    for data in (loader, ab["a"], {"vocab_size": 65536}):
        with pytest.raises(UserError, match="65536 tokens but the model's vocab_size is 49152"):
            check_vocab(data, 49152)


def test_loader_over_a_real_prepared_dataset(tmp_path, bpe_dir):
    (tmp_path / "src.txt").write_text("\n".join(make_corpus_text(80)))
    docs = [str(tmp_path / "src.txt")] + [str(tmp_path / f"d{i}.txt") for i in range(30)]
    for i, text in enumerate(make_corpus_text(30, seed=9)):
        (tmp_path / f"d{i}.txt").write_text(text)
    meta = prepare(docs, bpe_dir, tmp_path / "out", num_proc=1, verbose=False)
    loader = PackedLoader({"shakespeare": tmp_path / "out"}, batch_size=2, seq_len=32, seed=0)
    assert loader.vocab_size == 400 and loader.tokenizer_identity == meta["tokenizer"] and loader.eot_id == 0
    batches = take(loader, 20)
    flat = torch.cat(batches)
    assert int(flat.max()) < 400 and (flat == 0).any()
    assert loader.tokens_per_source == {"shakespeare": 20 * 2 * 32}


def test_eval_windows_predict_every_token_once_or_a_spread_sample(tmp_path):
    from smoltrain.data.loader import eval_spans

    n = 16 * 5 + 7  # 5 full windows of T=16, then 6 more predicted tokens
    d = fake_prepared(tmp_path / "v", np.arange(100), val=np.arange(1000, 1000 + n))
    batches = list(eval_windows(d, "val", T, 2))
    assert [tuple(b.shape) for b in batches] == [(2, 17), (2, 17), (1, 17), (1, 7)]  # the short one alone
    labels = torch.cat([b[:, 1:].flatten() for b in batches])
    assert labels.tolist() == list(range(1001, 1000 + n))  # every token after the first, exactly once
    assert eval_spans(1, T) == [] and eval_spans(2, T) == [(0, 2)]  # no complete window: still evaluated
    sample = eval_spans(16 * 100 + 1, T, max_tokens=16 * 4)
    assert [s for s, _ in sample] == [16 * w for w in (12, 37, 62, 87)]  # evenly spread, not the first four
    assert eval_spans(16 * 100 + 1, T, max_tokens=10**9) == eval_spans(16 * 100 + 1, T)
