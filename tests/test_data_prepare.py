"""prepare: token counts, shard format, validation split, atomic output, re-runs, interruption."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from smoltrain.data import prepare as prep
from smoltrain.data.prepare import is_val, prepare
from smoltrain.data.shards import load_meta, read_shard
from smoltrain.data.tokenizer import load_tokenizer
from smoltrain.errors import UserError

from .conftest import make_corpus_text, write_mixed_corpus


def split_tokens(out, split: str) -> np.ndarray:
    meta = load_meta(out)
    parts = [np.asarray(read_shard(out / s["file"])) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def expected_stream(tok, docs: list[str], val: bool, fraction: float) -> list[int]:
    return [t for i, d in enumerate(docs) if is_val(i, fraction) == val for t in tok.encode(d) + [tok.eot_id]]


def test_prepare_mixed_directory_counts_and_contents(tmp_path, bpe_dir):
    docs = write_mixed_corpus(tmp_path / "corpus")
    tok = load_tokenizer(bpe_dir)
    meta = prepare([tmp_path / "corpus"], tok, tmp_path / "out", val_fraction=0.25, num_proc=1, verbose=False)
    assert meta["num_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert meta["num_documents"] == len(docs)
    assert meta["splits"]["val"]["num_documents"] == 3  # round-half-up of 10 x 0.25
    assert meta == load_meta(tmp_path / "out")
    assert meta["tokenizer"] == tok.identity and meta["vocab_size"] == 400 and meta["dtype"] == "uint16"
    for split in ("train", "val"):
        assert split_tokens(tmp_path / "out", split).tolist() == expected_stream(tok, docs, split == "val", 0.25)
    assert load_tokenizer(tmp_path / "out" / "tokenizer").sha256 == tok.sha256  # self-describing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no staging debris


def test_real_smollm2_tokenizer_num_tokens(tmp_path, smollm2_tokenizer):
    """Acceptance: txt + jsonl + jsonl.gz + parquet + latin-1 with the real SmolLM2 tokenizer."""
    tok = smollm2_tokenizer
    docs = write_mixed_corpus(tmp_path / "corpus")
    meta = prepare([tmp_path / "corpus"], tok, tmp_path / "out", num_proc=1, verbose=False)
    assert tok.vocab_size == meta["vocab_size"] == 49152 and meta["eot_id"] == 0
    assert meta["num_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert meta["num_documents"] == len(docs) == 10
    assert meta["dtype"] == "uint16"
    train = split_tokens(tmp_path / "out", "train")
    assert (train == 0).sum() == meta["splits"]["train"]["num_documents"]  # one EOT per document
    assert train.tolist() == expected_stream(tok, docs, False, 0.01)


def test_num_proc_and_chunking_do_not_change_the_output(tmp_path, bpe_dir, monkeypatch):
    (tmp_path / "src").mkdir()
    for i, text in enumerate(make_corpus_text(60, seed=3)):
        (tmp_path / "src" / f"{i:03d}.txt").write_text(text)
    one = prepare([tmp_path / "src"], bpe_dir, tmp_path / "one", num_proc=1, verbose=False)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 1500)  # many chunks, out of order completion possible
    two = prepare([tmp_path / "src"], bpe_dir, tmp_path / "two", num_proc=2, verbose=False)
    assert one["splits"] == two["splits"]
    for f in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


def test_shards_roll_over_and_headers_are_checked(tmp_path, bpe_dir):
    (tmp_path / "src.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in make_corpus_text(40)))
    meta = prepare([tmp_path / "src.jsonl"], bpe_dir, tmp_path / "out", shard_tokens=500, val_fraction=0,
                   num_proc=1, verbose=False)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["num_tokens"] == 500 for s in shards[:-1])
    assert sum(s["num_documents"] for s in shards) == 40 and meta["splits"]["val"]["num_tokens"] == 0
    tok = load_tokenizer(bpe_dir)
    assert split_tokens(tmp_path / "out", "train").tolist() == expected_stream(tok, make_corpus_text(40), False, 0)
    first = tmp_path / "out" / shards[0]["file"]
    data = first.read_bytes()
    first.write_bytes(data[:-2])
    with pytest.raises(UserError, match="truncated"):
        read_shard(first)
    first.write_bytes(b"NOTMAGIC" + data[8:])
    with pytest.raises(UserError, match="not a smoltrain token shard"):
        read_shard(first)


def test_validation_documents_are_evenly_spaced_and_exact():
    for n, f in [(78, 0.01), (1000, 0.005), (10, 0.3), (7, 0.5), (49, 0.01), (50, 0.01)]:
        assert sum(is_val(i, f) for i in range(n)) == math.floor(n * f + 0.5)  # round half up
    picks = [i for i in range(1000) if is_val(i, 0.01)]
    assert len(picks) == 10 and all(b - a == 100 for a, b in zip(picks, picks[1:]))
    assert not any(is_val(i, 0.0) for i in range(100))


def test_val_docs_holds_out_exactly_n(tmp_path, bpe_dir):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in make_corpus_text(37)))
    meta = prepare([tmp_path / "d.jsonl"], bpe_dir, tmp_path / "out", val_docs=5, num_proc=1, verbose=False)
    assert meta["splits"]["val"]["num_documents"] == 5 and meta["splits"]["train"]["num_documents"] == 32
    with pytest.raises(UserError, match="--val-docs"):
        prepare([tmp_path / "d.jsonl"], bpe_dir, tmp_path / "o2", val_docs=37, num_proc=1, verbose=False)


def test_rerun_is_a_noop_force_rebuilds_and_other_inputs_are_refused(tmp_path, bpe_dir, capsys):
    (tmp_path / "a.txt").write_text("some text to tokenize " * 20)
    first = prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "out", num_proc=1)
    stamp = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    again = prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "out", num_proc=1)
    assert "already prepared" in capsys.readouterr().out and again == first
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="different max_documents"):
        prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "out", max_documents=3, num_proc=1)
    rebuilt = prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "out", num_proc=1, force=True, verbose=False)
    assert rebuilt["num_tokens"] == first["num_tokens"]
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns != stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an output of smoltrain prepare"):
        prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "other", num_proc=1)


def test_force_never_replaces_sources_or_foreign_files(tmp_path, bpe_dir):
    """--force replaces an earlier prepare output only: not the source dir, not a parent of a source, not a
    directory with files prepare did not write. Each refusal names the path and deletes nothing."""
    src = tmp_path / "texts"
    src.mkdir()
    (src / "a.txt").write_text("some text to tokenize " * 20)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path):
        with pytest.raises(UserError, match=f"--out {out} (is|contains) this command's own input"):
            prepare([src], bpe_dir, out, num_proc=1, force=True, verbose=False)
    with pytest.raises(UserError, match="own input"):
        prepare([src / "a.txt"], bpe_dir, src, num_proc=1, force=True, verbose=False)
    assert sorted(p.name for p in src.iterdir()) == before
    out = tmp_path / "out"
    prepare([src], bpe_dir, out, num_proc=1, verbose=False)
    (out / "notes.md").write_text("my notes")  # a file prepare did not write
    with pytest.raises(UserError, match="notes.md") as e:
        prepare([src], bpe_dir, out, num_proc=1, force=True, max_documents=1, verbose=False)
    assert "even with --force" in str(e.value) and (out / "notes.md").read_text() == "my notes"
    (out / "notes.md").unlink()
    rebuilt = prepare([src], bpe_dir, out, num_proc=1, force=True, max_documents=1, verbose=False)
    assert load_meta(out) == rebuilt and json.loads((out / ".smoltrain-output.json").read_text())["command"] == "prepare"


def test_a_directory_without_our_marker_is_never_replaced(tmp_path, bpe_dir):
    """Without its marker nothing says which files prepare wrote: --force refuses it, and it stays."""
    (tmp_path / "a.txt").write_text("some text to tokenize " * 20)
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt"], bpe_dir, out, num_proc=1, verbose=False)
    (out / ".smoltrain-output.json").unlink()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="not an output of smoltrain prepare"):
        prepare([tmp_path / "a.txt"], bpe_dir, out, num_proc=1, max_documents=1, force=True, verbose=False)
    assert sorted(p.name for p in out.iterdir()) == before


def _fail_on_second_chunk(monkeypatch):
    real, calls = prep._encode_chunk, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return real(*args)

    monkeypatch.setattr(prep, "_encode_chunk", flaky)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 500)


def test_interrupted_prepare_leaves_nothing_and_force_keeps_the_old_output(tmp_path, bpe_dir, monkeypatch):
    (tmp_path / "src").mkdir()
    for i, text in enumerate(make_corpus_text(30)):
        (tmp_path / "src" / f"{i:02d}.txt").write_text(text)
    _fail_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "src"], bpe_dir, tmp_path / "out", num_proc=1, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no debris

    monkeypatch.undo()
    old = prepare([tmp_path / "src"], bpe_dir, tmp_path / "out", num_proc=1, max_documents=10, verbose=False)
    _fail_on_second_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "src"], bpe_dir, tmp_path / "out", num_proc=1, force=True, verbose=False)
    assert load_meta(tmp_path / "out") == old  # --force replaces the old output only once the new one is done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_killed_prepare_leaves_no_trusted_output(tmp_path, bpe_dir):
    """SIGKILL mid-run: no output directory appears; the next run cleans the staging debris and succeeds."""
    (tmp_path / "src").mkdir()
    big = "\n".join(make_corpus_text(400, seed=5)) + "\n"
    for i in range(8):
        (tmp_path / "src" / f"{i}.txt").write_text(big * 6)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "smoltrain", "prepare", "--source", str(tmp_path / "src"),
                             "--tokenizer", str(bpe_dir), "--out", str(out), "--num-proc", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".staging-out-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not out.exists()
    with pytest.raises(UserError, match="does not exist"):
        load_meta(out)
    assert list(tmp_path.glob(".staging-out-*"))  # debris of the dead run ...
    meta = prepare([tmp_path / "src"], bpe_dir, out, num_proc=1, max_documents=2, verbose=False)
    assert not list(tmp_path.glob(".*-out-*"))  # ... removed by the next run
    assert load_meta(out) == meta
