"""StreamLoader: tokenized ahead of the step in worker processes, mixed by weight, packed like PackedLoader,
and resumed exactly (from a few hundred bytes of JSON) after kill -9, with any number of workers."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from smoltrain.data.stream import StreamLoader
from smoltrain.data.tokenizer import load_tokenizer
from smoltrain.errors import UserError

from .conftest import assert_user_error, make_corpus_text
from .test_trainer import losses, train

T = 24


def write_jsonl(root, docs: list[str], parts: int) -> None:
    root.mkdir(parents=True)
    per = -(-len(docs) // parts)
    for i in range(parts):
        lines = (json.dumps({"text": d, "id": j}) for j, d in enumerate(docs[i * per:(i + 1) * per]))
        (root / f"part{i}.jsonl").write_text("\n".join(lines))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two local datasets of three jsonl files each (three shards for `datasets`)."""
    base = tmp_path_factory.mktemp("stream")
    docs = {"a": make_corpus_text(45, seed=4, words_per_doc=(5, 40)),
            "b": make_corpus_text(60, seed=5, words_per_doc=(20, 60))}
    for name, texts in docs.items():
        write_jsonl(base / name, texts, 3)
    return {n: base / n for n in docs}, docs


def packed(tok, docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in tok.encode(d) + [tok.eot_id]])


def windows(stream: np.ndarray, n: int) -> np.ndarray:
    """The first n windows (T+1 tokens, stride T) of a token stream that repeats epoch after epoch."""
    reps = -(-(n * T + 1) // len(stream))
    flat = np.tile(stream, reps + 1)
    return np.stack([flat[i * T:i * T + T + 1] for i in range(n)])


def test_batches_are_the_packed_token_stream(corpora, bpe_dir):
    roots, docs = corpora
    tok = load_tokenizer(bpe_dir)
    for spec in (f"hf:{roots['a']}", roots["a"]):  # through load_dataset(dir) and through the json builder
        loader = StreamLoader(spec, tok, batch_size=2, seq_len=T, chunk_chars=200)
        got = torch.cat([loader.next_batch() for _ in range(40)])  # past the end of the first epoch
        assert got.shape == (80, T + 1) and got.dtype == torch.int64
        assert got.numpy().tolist() == windows(packed(tok, docs["a"]), 80).tolist()
        assert loader.tokens_per_source == {"a": 80 * T}


def test_txt_files_stream_one_document_per_file(tmp_path, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    docs = make_corpus_text(6, seed=2)
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d + "\nsecond line")
    loader = StreamLoader(tmp_path, tok, batch_size=1, seq_len=T)
    got = torch.cat([loader.next_batch()[0, :-1] for _ in range(4)])
    assert got.tolist() == packed(tok, [d + "\nsecond line" for d in docs])[:4 * T].tolist()


def mixed(corpora, bpe_dir, num_workers: int) -> StreamLoader:
    roots, _ = corpora
    return StreamLoader({n: str(r) for n, r in roots.items()}, bpe_dir, batch_size=3, seq_len=T, seed=7,
                        weights={"a": 1, "b": 2}, grad_accum_steps=2, num_workers=num_workers, chunk_chars=300)


@pytest.mark.slow  # spawns 6 worker processes: 7 min on this host under load 27
def test_same_windows_with_0_1_2_workers_and_exact_resume_across_them(corpora, bpe_dir):
    """The chunks are numbered and encoded by worker (number % N): every worker count yields the same
    windows; a state saved under 2 workers (mid-step, mid-chunk) resumes in-process."""
    tok = load_tokenizer(bpe_dir)
    roots, docs = corpora
    straight = mixed(corpora, bpe_dir, 0)
    want = [straight.next_batch() for _ in range(40)]
    src = np.concatenate([straight.mixture.draw(s, 6) for s in range(20)])  # 6 rows a step, in step order
    for k, name in enumerate(("a", "b")):  # each dataset's rows are its own packed stream, in order
        rows = torch.cat(want).numpy()[src == k]
        assert rows.tolist() == windows(packed(tok, docs[name]), len(rows)).tolist()
    assert straight.tokens_per_source == {"a": int((src == 0).sum()) * T, "b": int((src == 1).sum()) * T}
    one = mixed(corpora, bpe_dir, 1)
    assert all(torch.equal(one.next_batch(), w) for w in want)
    two = mixed(corpora, bpe_dir, 2)
    assert all(torch.equal(two.next_batch(), w) for w in want[:27])
    state = json.loads(json.dumps(two.state_dict()))  # through a checkpoint file
    assert state["micro_step"] == 1 and len(json.dumps(state)) < 4000
    resumed = mixed(corpora, bpe_dir, 0)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), w) for w in want[27:])
    assert resumed.tokens_per_source == straight.tokens_per_source


@pytest.mark.parametrize("stop_after", [1, 12, 23])  # early, mid-epoch, just past the first epoch's end
def test_resume_in_process_yields_identical_batches(corpora, bpe_dir, stop_after):
    roots, _ = corpora
    full = StreamLoader(f"hf:{roots['a']}", bpe_dir, batch_size=3, seq_len=T, chunk_chars=150)
    want = [full.next_batch() for _ in range(30)]  # more than one epoch (the corpus is ~21 batches)
    assert full.state_dict()["feeds"]["a"]["epoch"] == 1
    first = StreamLoader(f"hf:{roots['a']}", bpe_dir, batch_size=3, seq_len=T, chunk_chars=150)
    for _ in range(stop_after):
        first.next_batch()
    resumed = StreamLoader(f"hf:{roots['a']}", bpe_dir, batch_size=3, seq_len=T, chunk_chars=150)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got = [resumed.next_batch() for _ in range(30 - stop_after)]
    assert all(torch.equal(x, y) for x, y in zip(got, want[stop_after:]))


def test_mixture_serves_the_configured_weights_over_10k_windows(tmp_path, bpe_dir):
    for name, seed in (("web", 11), ("code", 12), ("math", 13)):
        write_jsonl(tmp_path / name, make_corpus_text(600, seed=seed, words_per_doc=(20, 80)), 4)
    weights = {"web": 0.6, "code": 0.3, "math": 0.1}
    loader = StreamLoader({n: str(tmp_path / n) for n in weights}, bpe_dir, batch_size=50, seq_len=8,
                          weights=weights, chunk_chars=1 << 14)  # any num_workers serves the same windows
    batches = [loader.next_batch() for _ in range(200)]  # 10,000 windows
    assert sum(len(b) for b in batches) == 10_000
    served = {n: t / 8 / 10_000 for n, t in loader.tokens_per_source.items()}
    for name, w in weights.items():
        assert abs(served[name] - w) <= 0.05 * w, served


def test_ranks_read_disjoint_documents(corpora, bpe_dir):
    roots, _ = corpora
    tok = load_tokenizer(bpe_dir)
    rows = [StreamLoader(f"hf:{roots['a']}", tok, 1, T, rank=r, world_size=3).next_batch()[0] for r in range(3)]
    assert len({tuple(r.tolist()) for r in rows}) == 3
    with pytest.raises(UserError, match="rank"):
        StreamLoader(f"hf:{roots['a']}", tok, 1, T, rank=0, world_size=2).load_state_dict(
            StreamLoader(f"hf:{roots['a']}", tok, 1, T, rank=1, world_size=2).state_dict())


def test_mixed_formats_and_missing_column_are_user_errors(tmp_path, bpe_dir):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "y"}) + "\n")
    with pytest.raises(UserError, match="mixes file formats"):
        StreamLoader(tmp_path, bpe_dir, 1, T)
    with pytest.raises(UserError, match="no 'text' column"):
        StreamLoader(tmp_path / "b.jsonl", bpe_dir, 1, T, num_workers=1)


@pytest.fixture(scope="module")
def stream_args(tmp_path_factory, tiny_tokenizer_dir):
    """debug-tiny streaming a mixture of two local parquet datasets (SmolLM-Corpus's shape), no prepare."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("streamed")
    for name, seed in (("web", 21), ("books", 22)):
        (base / name).mkdir()
        docs = make_corpus_text(80, seed=seed, words_per_doc=(100, 300))
        for i in range(4):
            pq.write_table(pa.table({"text": docs[i::4]}), base / name / f"{i:05d}.parquet")
    datasets = f"[{{name: web, sources: ['{base / 'web'}'], weight: 3}}, {{name: books, sources: ['{base / 'books'}']}}]"
    return ["--set", f"data.tokenizer={tiny_tokenizer_dir}", "--set", "data.train_tokenizer_vocab_size=0",
            "--set", f"data.datasets={datasets}", "--set", "data.streaming=true"]


@pytest.mark.slow  # three training runs with spawned workers
def test_streaming_run_resumes_exactly_after_kill_9(tmp_path, stream_args):
    """One worker uninterrupted; two workers killed at step 14 and resumed with one: the same losses, so the
    stream is one stream whatever the worker count, and its position survives both kill and count change."""
    straight = train(tmp_path / "a", [*stream_args, "--set", "data.num_workers=1"])
    assert straight.returncode == 0, straight.stderr
    killed = train(tmp_path / "b", [*stream_args, "--set", "data.num_workers=2"],
                   env={"SMOLTRAIN_FAULT": "after_step=14"})
    assert killed.returncode == -signal.SIGKILL
    resumed = train(tmp_path / "b", [*stream_args, "--set", "data.num_workers=1"])
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000010 (step 10)" in resumed.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 30 and a == b  # 30 train steps (a stream has no held-out split), floats compared exactly
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_00000030" / "train_state.json").read_text())
    assert state["loader"]["kind"] == "stream" and set(state["loader"]["feeds"]) == {"web", "books"}


def test_streaming_refuses_a_dataset_of_several_sources(tmp_path, stream_args, tiny_tokenizer_dir):
    d = tmp_path / "x.txt"
    d.write_text("hello")
    two = f"[{{name: a, sources: ['{d}', '{d}']}}]"
    proc = train(tmp_path / "r", [*stream_args, "--set", f"data.datasets={two}"])
    assert_user_error(proc, "exactly one source per dataset")
