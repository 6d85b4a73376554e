"""train_tokenizer: SmolLM2-style special ids, loadable by us and by transformers; load_tokenizer forms."""

from __future__ import annotations

import json

import pytest

from smoltrain.data.prepare import train_tokenizer
from smoltrain.data.tokenizer import load_tokenizer
from smoltrain.errors import UserError

from .conftest import assert_user_error, make_corpus_text, run_cli

TEXT = "The king's 1603 crown, café and 東京!\n  Indented line."


def test_trained_tokenizer_has_smollm2_special_ids(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.vocab_size == 400
    assert tok.eot_id == 0
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # byte-level: lossless on any text
    assert 0 not in ids and 1 not in ids  # encode adds no special tokens
    assert tok.encode("<|endoftext|>") == [0]  # but the special token text maps to its id
    assert tok.encode("2024") == [tok.token_id(d) for d in "2024"]  # digits are split one by one


def test_trained_tokenizer_loads_in_transformers(bpe_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(bpe_dir)
    hf = AutoTokenizer.from_pretrained(str(bpe_dir), local_files_only=True)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT)
    assert hf.decode(ours.encode(TEXT)) == TEXT
    assert json.loads((bpe_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_train_tokenizer_from_jsonl_with_extra_special_token(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"body": t}) for t in make_corpus_text(50)))
    tok = train_tokenizer([src], 300, tmp_path / "tok", text_key="body", extra_special_tokens=["<pad>"])
    assert tok.token_id("<pad>") == 3 and tok.vocab_size == 300
    with pytest.raises(UserError, match="--force"):
        train_tokenizer([src], 300, tmp_path / "tok", text_key="body")
    with pytest.raises(UserError, match="too small"):
        train_tokenizer([src], 100, tmp_path / "tok2", text_key="body")


def test_load_tokenizer_forms(bpe_dir, tmp_path):
    by_dir = load_tokenizer(bpe_dir)
    by_file = load_tokenizer(bpe_dir / "tokenizer.json")
    assert by_file.encode(TEXT) == by_dir.encode(TEXT) and by_file.sha256 == by_dir.sha256
    by_dir.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").identity["sha256"] == by_dir.sha256
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_train_cli(tmp_path):
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(make_corpus_text(30)):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(text)
    proc = run_cli("tokenizer", "train", "--source", tmp_path / "docs", "--vocab-size", "300", "--out",
                   tmp_path / "tok")
    assert proc.returncode == 0, proc.stderr
    assert "300 tokens" in proc.stdout
    assert load_tokenizer(tmp_path / "tok").eot_id == 0
    assert_user_error(run_cli("tokenizer", "train", "--source", tmp_path / "nope", "--vocab-size", "300",
                              "--out", tmp_path / "tok2"), "does not exist")
