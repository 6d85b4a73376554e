"""Bits per byte on a held-out document equals an independent computation with transformers on the export."""

from __future__ import annotations

import json
import math

import torch

from .conftest import make_corpus_text, run_cli


def test_eval_bpb_matches_transformers_on_the_export(tmp_path, tiny_ckpt, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = make_corpus_text(4, seed=9, words_per_doc=(150, 200))
    for i, doc in enumerate(docs):
        (corpus / f"doc{i}.txt").write_text(doc)
    data = tmp_path / "data"
    prep = run_cli("prepare", "--source", corpus, "--tokenizer", tiny_tokenizer_dir, "--out", data,
                   "--val-documents", "doc2.txt", "--num-proc", "1", "--no-progress")
    assert prep.returncode == 0, prep.stderr
    assert json.loads((data / "meta.json").read_text())["val_documents"] == ["doc2.txt"]
    ours = run_cli("eval", tiny_ckpt, "--data", data, "--seq-len", "64", "--json")
    assert ours.returncode == 0, ours.stderr
    ours = json.loads(ours.stdout)
    hf = tmp_path / "hf"
    assert run_cli("export", tiny_ckpt, "--out", hf).returncode == 0

    # independently: transformers on the export, the document + <|endoftext|>, stride-64 windows
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    text = docs[2]
    ids = tok(text, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|endoftext|>")]
    nats, text_nats, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 64):
            w = torch.tensor([ids[start:start + 65]])
            nll = torch.nn.functional.cross_entropy(model(w[:, :-1]).logits[0], w[0, 1:], reduction="none")
            nats += float(nll.sum())
            text_nats += float(nll[:-1].sum()) if start + 65 >= len(ids) else float(nll.sum())  # not the EOT
            tokens += len(nll)
    first = tok.decode(ids[:1])
    assert first.isascii()  # so the predicted text is the document minus its first token's bytes
    nbytes = len(text.encode("utf-8")) - len(first.encode("utf-8"))
    assert ours["tokens"] == tokens == len(ids) - 1
    assert ours["bytes"] == nbytes
    assert math.isclose(ours["bpb"], text_nats / math.log(2) / nbytes, rel_tol=5e-3)
    assert math.isclose(ours["loss"], nats / tokens, rel_tol=5e-3)
    assert ours["bpb"] != nats / math.log(2) / nbytes  # the <|endoftext|> prediction is not counted


def test_eval_a_split_shorter_than_one_window(tmp_path, tiny_ckpt, tiny_tokenizer_dir):
    from smoltrain.data.prepare import prepare

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "long.txt").write_text(" ".join(make_corpus_text(3, seed=1)))
    (tmp_path / "src" / "short.txt").write_text("To be, or not.")
    meta = prepare([tmp_path / "src"], tiny_tokenizer_dir, tmp_path / "data", val_documents=["short.txt"],
                   num_proc=1, verbose=False, progress=False)
    n = meta["splits"]["val"]["num_tokens"]
    assert 2 <= n < 256  # no complete window of the model's context (256)
    proc = run_cli("eval", tiny_ckpt, "--data", tmp_path / "data", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    from smoltrain.data.tokenizer import load_tokenizer

    first = load_tokenizer(tiny_tokenizer_dir).decode(load_tokenizer(tiny_tokenizer_dir).encode("To be, or not.")[:1])
    assert res["tokens"] == n - 1 and res["seq_len"] == 256 and res["bytes"] == len("To be, or not.") - len(first)
