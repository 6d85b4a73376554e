"""Document sources: local formats, directories, bad inputs, and hf: datasets through a local stand-in."""

from __future__ import annotations

import json
import logging

import pytest

from smoltrain.data import sources
from smoltrain.data.sources import count_documents, iter_documents, parse_hf_spec, resolve_source
from smoltrain.errors import UserError

from .conftest import write_mixed_corpus


def test_mixed_directory_in_sorted_order(tmp_path, caplog):
    expected = write_mixed_corpus(tmp_path / "corpus")
    with caplog.at_level(logging.WARNING, logger="smoltrain.data"):
        docs = list(iter_documents([tmp_path / "corpus"]))
    assert docs == expected
    assert "\ufffd" in docs[6]  # latin-1 bytes replaced, not a crash
    assert any("latin1.txt is not valid UTF-8" in r.getMessage() for r in caplog.records)
    src = resolve_source(tmp_path / "corpus")
    assert count_documents([src]) == len(expected)
    assert list(iter_documents([src], max_documents=4)) == expected[:4]
    assert count_documents([src], max_documents=4) == 4


def test_unsupported_files_in_a_directory_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "notes.md").write_text("# not data")
    with caplog.at_level(logging.WARNING, logger="smoltrain.data"):
        assert list(iter_documents([tmp_path])) == ["hello"]
    assert "notes.md" in caplog.text


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no readable documents"),
    (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "unsupported type"),
])
def test_bad_sources_are_user_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        resolve_source(make(tmp_path))


def test_jsonl_text_key_and_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "one"}) + "\n" + json.dumps({"content": None}) + "\n")
    assert list(iter_documents([path], text_key="content")) == ["one", ""]
    with pytest.raises(UserError, match=r"line 1 has no 'text' field \(fields: content\)"):
        list(iter_documents([path]))
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        list(iter_documents([path]))


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "d.parquet")
    assert list(iter_documents([tmp_path / "d.parquet"], text_key="body")) == ["a", "b"]
    with pytest.raises(UserError, match="no 'text' column"):
        list(iter_documents([tmp_path / "d.parquet"]))


def test_hf_spec_parsing():
    assert parse_hf_spec("hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2") == (
        "HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train")
    assert parse_hf_spec("hf:user/ds") == ("user/ds", None, "train")
    assert parse_hf_spec("hf:user/ds::validation") == ("user/ds", None, "validation")
    with pytest.raises(UserError, match="Bad dataset spec"):
        parse_hf_spec("hf:")


def test_hf_source_streams_a_local_dataset(tmp_path):
    """A local dataset directory stands in for the hub: load_dataset(..., streaming=True) reads it alike."""
    (tmp_path / "ds").mkdir()
    rows = [{"text": f"document {i}"} for i in range(7)]
    (tmp_path / "ds" / "part.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = list(iter_documents([f"hf:{tmp_path / 'ds'}"], max_documents=5))
    assert docs == [f"document {i}" for i in range(5)]


def test_hf_source_passes_name_config_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": "a"}, {"text": "b"}, {"text": "c"}])

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents(["hf:org/corpus:cfg:test"], max_documents=2)) == ["a", "b"]
    assert calls == [("org/corpus", "cfg", "test", True)]


def test_unknown_hf_dataset_is_a_user_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="Could not open the Hugging Face dataset nobody/nothing"):
        sources.open_hf("nobody/nothing", None, "train")
