"""StreamLoader: packing on the fly from a datasets IterableDataset (a local stand-in for the hub), and
resuming from the stream's own state plus the unserved tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smoltrain.data.stream import StreamLoader
from smoltrain.data.tokenizer import load_tokenizer
from smoltrain.errors import UserError

from .conftest import make_corpus_text

T = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local dataset directory of three jsonl files (three shards for `datasets`)."""
    root = tmp_path_factory.mktemp("stream") / "ds"
    root.mkdir()
    docs = make_corpus_text(45, seed=4, words_per_doc=(5, 40))
    for i in range(3):
        (root / f"part{i}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[i * 15:(i + 1) * 15]))
    return root, docs


def record_reads(loader: StreamLoader) -> list[str]:
    """Every document the loader reads from its stream, in order."""
    seen, read = [], loader._read_documents

    def recording(num_chars: int) -> list[str]:
        docs = read(num_chars)
        seen.extend(docs)
        return docs

    loader._read_documents = recording
    return seen


def packed(tok, docs: list[str]) -> np.ndarray:
    return np.array([t for d in docs for t in tok.encode(d) + [tok.eot_id]])


def test_batches_are_the_packed_token_stream(corpus, bpe_dir):
    root, docs = corpus
    tok = load_tokenizer(bpe_dir)
    stream = packed(tok, docs)
    for spec in (f"hf:{root}", root):  # through load_dataset(dir) and through the json builder
        loader = StreamLoader(spec, tok, batch_size=2, seq_len=T)
        flat = []
        for _ in range(5):
            b = loader.next_batch()
            assert b.shape == (2, T + 1) and b.dtype == torch.int64
            assert torch.equal(b[0, -1], b[1, 0])  # consecutive rows continue the stream (stride T)
            flat += [b[0, :-1], b[1, :-1]]
        assert torch.cat(flat).tolist() == stream[:10 * T].tolist()
        assert loader.tokens_per_source == {str(spec): 10 * T}


def test_txt_files_stream_one_document_per_file(tmp_path, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    docs = make_corpus_text(6, seed=2)
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d + "\nsecond line")
    loader = StreamLoader(tmp_path, tok, batch_size=1, seq_len=T)
    got = torch.cat([loader.next_batch()[0, :-1] for _ in range(4)])
    assert got.tolist() == packed(tok, [d + "\nsecond line" for d in docs])[:4 * T].tolist()


@pytest.mark.parametrize("stop_after", [1, 12, 23])  # early, mid-epoch, just past the first epoch's end
def test_resume_yields_identical_batches_without_rereading(corpus, bpe_dir, stop_after):
    root, docs = corpus
    tok = load_tokenizer(bpe_dir)
    full = StreamLoader(f"hf:{root}", tok, batch_size=3, seq_len=T)
    want = [full.next_batch() for _ in range(30)]  # more than one epoch (the corpus is ~21 batches)
    assert full.state_dict()["epoch"] == 1
    first = StreamLoader(f"hf:{root}", tok, batch_size=3, seq_len=T)
    read_before = record_reads(first)
    for _ in range(stop_after):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # through a checkpoint file

    resumed = StreamLoader(f"hf:{root}", tok, batch_size=3, seq_len=T)
    resumed.load_state_dict(state)
    read_after = record_reads(resumed)
    got = [resumed.next_batch() for _ in range(30 - stop_after)]
    assert all(torch.equal(x, y) for x, y in zip(got, want[stop_after:]))
    assert resumed.tokens_per_source == full.tokens_per_source
    # the stream continued where it stopped: the first document read after resuming follows the last before
    seen = len(read_before) % len(docs)
    k = min(len(read_after), len(docs) - seen)
    assert k > 0 and read_after[:k] == docs[seen:seen + k]


def test_ranks_read_disjoint_documents(corpus, bpe_dir):
    root, docs = corpus
    tok = load_tokenizer(bpe_dir)
    rows = [StreamLoader(f"hf:{root}", tok, 1, T, rank=r, world_size=3).next_batch()[0] for r in range(3)]
    assert len({tuple(r.tolist()) for r in rows}) == 3
    with pytest.raises(UserError, match="rank"):
        StreamLoader(f"hf:{root}", tok, 1, T, rank=0, world_size=2).load_state_dict(
            StreamLoader(f"hf:{root}", tok, 1, T, rank=1, world_size=2).state_dict())


def test_mixed_formats_and_missing_column_are_user_errors(tmp_path, bpe_dir):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "y"}) + "\n")
    with pytest.raises(UserError, match="mixes file formats"):
        StreamLoader(tmp_path, bpe_dir, 1, T)
    with pytest.raises(UserError, match="no 'text' column"):
        StreamLoader(tmp_path / "b.jsonl", bpe_dir, 1, T).next_batch()
