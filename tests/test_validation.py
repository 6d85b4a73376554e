"""Bad input is refused up front: config domains at resolve time, CLI option domains and broken files
before any work, each with exit 2, one message naming the field, no traceback and nothing written."""

from __future__ import annotations

import dataclasses

import pytest

from smoltrain.config import Config, load_config
from smoltrain.domain import checked, interval, nonneg, positive, problems
from smoltrain.errors import UserError

# (override, words the message must contain): each one alone must be refused by load_config.
BAD_CONFIG = [
    ("eval.sample_tokens=-1", "eval.sample_tokens must be >= 0"),
    ("eval.temperature=-1", "eval.temperature must be 0 (greedy) or >= 0.0001"),
    ("eval.temperature=1e-300", "eval.temperature must be 0 (greedy) or >= 0.0001"),
    ("eval.temperature=nan", "eval.temperature must be a finite number"),
    ("eval.top_k=-1", "eval.top_k must be >= 0"),
    ("eval.top_p=0", "eval.top_p must be in (0, 1]"),
    ("eval.top_p=1.5", "eval.top_p must be in (0, 1]"),
    ("eval.max_tokens=0", "eval.max_tokens must be > 0 or null"),
    ("eval.every=-1", "eval.every must be >= 0 (0: only at the end)"),
    ("eval.sample_every=-2", "eval.sample_every must be >= 0"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=.inf", "optim.lr must be a finite number"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.beta1=1.5", "optim.beta1 must be in [0, 1)"),
    ("optim.beta2=1", "optim.beta2 must be in [0, 1)"),
    ("optim.eps=-1", "optim.eps must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0 (0: no clipping)"),
    ("optim.min_lr=1", "optim.min_lr (1.0) must not exceed optim.lr"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("optim.decay_steps=0", "optim.decay_steps must be > 0 or null"),
    ("train.max_steps=0", "train.max_steps must be > 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0"),
    ("train.seq_len=-4", "train.seq_len must be > 0"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps must be > 0"),
    ("train.global_batch_size=0", "train.global_batch_size must be > 0 or null"),
    ("train.seed=-1", "train.seed must be in [0, 2**63)"),
    ("train.loss_chunk=-1", "train.loss_chunk must be 'auto' or an integer >= 0"),
    ("train.dtype=fp8", "train.dtype must be one of auto, fp32, bf16, fp16"),
    ("checkpoint.every=-1", "checkpoint.every must be >= 0"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0 (0: keep all)"),
    ("checkpoint.min_free_gb=nan", "checkpoint.min_free_gb must be a finite number"),
    ("log.every=0", "log.every must be > 0"),
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1)"),
    ("data.max_documents=0", "data.max_documents must be > 0 or null"),
    ("data.num_proc=-1", "data.num_proc must be >= 0 (0: all cores)"),
    ("data.train_tokenizer_vocab_size=-5", "data.train_tokenizer_vocab_size must be >= 0"),
    ("data.stages=[{start: 5, weights: {shakespeare: 1}}]", "unknown key 'data.stages[0].start'"),
    ("data.stages=[{start_step: 5}]", "data.stages[0].weights is required"),
    ("data.stages=[{start_step: -5, weights: {shakespeare: 1}}]", "data.stages[0].start_step must be >= 0"),
    ("data.stages=[{start_step: 5, weights: {nope: 1}}]", "data.stages[0].weights names unknown dataset(s) nope"),
    ("data.stages=[{start_step: 5, weights: {shakespeare: -1}}]", "data.stages[0].weights must be finite numbers"),
    ("data.datasets=[{name: a, sources: [x], wieght: 2}]", "unknown key 'data.datasets[0].wieght'"),
    ("data.datasets=[{name: a, sources: [x], weight: -2}]", "data.datasets[0].weight must be >= 0"),
    ("model.rope_theta=0", "model.rope_theta must be > 0"),
    ("model.rms_norm_eps=-1e-5", "model.rms_norm_eps must be > 0"),
    ("model.eos_token_id=[0, -3]", "model.eos_token_id[1] must be >= 0"),
    ("model.bos_token_id=100000", "must be below model.vocab_size"),
    ("parallel.strategy=tp", "parallel.strategy must be one of"),
    ("train.device=gpu", "train.device must be auto, cpu, mps, cuda or cuda:N"),
]


@pytest.mark.parametrize("override,needle", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_config_domain_refused(override, needle):
    with pytest.raises(UserError) as e:
        load_config("configs/debug-tiny.yaml", [override])
    assert needle in str(e.value), str(e.value)


def test_all_domain_problems_in_one_message():
    one_per_key = {o.split("=")[0]: (o, needle) for o, needle in reversed(BAD_CONFIG)}
    del one_per_key["optim.min_lr"]  # compared with optim.lr, which is nan here
    with pytest.raises(UserError) as e:
        load_config("configs/debug-tiny.yaml", [o for o, _ in one_per_key.values()])
    msg = str(e.value)
    missing = [needle for _, needle in one_per_key.values() if needle not in msg]
    assert not missing and len(one_per_key) > 30, (missing, msg)


def test_good_edges_accepted():
    cfg = load_config("configs/debug-tiny.yaml", [
        "eval.max_tokens=null", "eval.every=0", "eval.temperature=0", "eval.top_k=0", "eval.top_p=1",
        "eval.sample_tokens=0", "optim.beta1=0", "optim.grad_clip=0", "optim.weight_decay=0",
        "data.stages=[{start_step: 0, weights: {shakespeare: 1}}, {start_step: 9, weights: {shakespeare: 2}}]"])
    assert cfg.eval.max_tokens is None and cfg.data.stages[1].start_step == 9
    assert cfg.to_dict()["data"]["stages"][1] == {"start_step": 9, "weights": {"shakespeare": 2}}


def test_every_default_lies_in_its_domain():
    assert problems(Config(), "config") == []


def test_a_new_field_needs_one_line():
    """The mechanism other sections use: a domain next to the default, checked with everything else."""
    @dataclasses.dataclass
    class Section:
        steps: int = checked(3, positive)
        ratio: float = checked(0.5, interval(0, 1))
        every: int | None = checked(None, nonneg("off"))

    assert problems(Section(), "s") == []
    assert problems(Section(steps=0, ratio=float("inf"), every=-1), "s") == [
        "s.steps must be > 0 (got 0)", "s.ratio must be a finite number (got inf)",
        "s.every must be >= 0 (0: off) or null (got -1)"]


# --- end to end: `python -m smoltrain ...` exits 2, names the field, writes nothing ---------------------

TRAIN_BAD = [
    (["optim.lr=nan", "optim.beta1=1.5", "optim.eps=-1"],
     ["optim.lr must be a finite number", "optim.beta1 must be in [0, 1)", "optim.eps must be > 0"]),
    (["eval.sample_tokens=-1", "eval.temperature=-1", "eval.top_k=-1", "eval.max_tokens=0", "eval.every=-1"],
     ["eval.sample_tokens", "eval.temperature", "eval.top_k", "eval.max_tokens", "eval.every"]),
    (["data.stages=[{start: 5, weights: {shakespeare: 1}}]"], ["data.stages[0].start"]),
    (["train.init_from=/nonexistent/ckpt", "data.datasets=[{name: a, sources: [/nonexistent/texts]}]"],
     ["train.init_from /nonexistent/ckpt does not exist", "data.datasets[0].sources: /nonexistent/texts"]),
]


@pytest.mark.parametrize("overrides,needles", TRAIN_BAD, ids=["optim", "eval", "stages", "paths"])
def test_train_refuses_before_any_work(tmp_path, monkeypatch, overrides, needles):
    """debug-tiny fetches Shakespeare and trains a tokenizer first: none of that may happen."""
    from tests.conftest import DEBUG_TINY, assert_user_error, run_cli

    cache = tmp_path / "cache"
    monkeypatch.setenv("SMOLTRAIN_CACHE", str(cache))
    monkeypatch.setenv("SMOLTRAIN_ASSETS", str(tmp_path / "assets"))
    sets = [f"run.dir={tmp_path / 'run'}", f"run.data_dir={tmp_path / 'data'}", *overrides]
    proc = run_cli("train", "--config", DEBUG_TINY, *[x for s in sets for x in ("--set", s)])
    assert_user_error(proc, *needles)
    assert proc.stderr.count("error:") == 1  # one message with every problem
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, data dir, cache or assets


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_ckpt, tiny_tokenizer_dir) -> dict:
    """A prepared split, a file, an HF dir whose config.json lacks fields, one that is not an object."""
    import json
    import shutil

    from smoltrain.data.prepare import prepare
    from tests.conftest import make_corpus_text

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "corpus").mkdir()
    for i, doc in enumerate(make_corpus_text(12, seed=5, words_per_doc=(100, 200))):
        (root / "corpus" / f"{i:02d}.txt").write_text(doc)
    prepare([root / "corpus"], tiny_tokenizer_dir, root / "data", val_docs=3, num_proc=1, progress=False)
    (root / "a_file").write_text("not a directory")
    (root / "bad_tok").mkdir()
    (root / "bad_tok" / "tokenizer.json").write_text("garbage")
    (root / "latin1.yaml").write_bytes(b"\xff\xfe train: {}")
    (root / "list_data").mkdir()
    (root / "list_data" / "meta.json").write_text("[]")
    hf = json.loads((tiny_ckpt / "config.json").read_text())
    for name, cfg in (("no_fields", {k: v for k, v in hf.items() if k not in ("hidden_size", "vocab_size")}),
                      ("a_list", [hf])):
        (root / name).mkdir()
        shutil.copy(tiny_ckpt / "model.safetensors", root / name)
        (root / name / "config.json").write_text(json.dumps(cfg))
    return {"root": root, "data": root / "data", "file": root / "a_file", "ckpt": tiny_ckpt,
            "tok": tiny_tokenizer_dir, "corpus": root / "corpus"}


# (arguments with {placeholders}, words the message must contain); "{out}" must not exist afterwards.
CLI_BAD = [
    ("eval {ckpt} --data {data} --seq-len 0", ["--seq-len", "must be > 0"]),
    ("eval {ckpt} --data {data} --batch-size 0", ["--batch-size", "must be > 0"]),
    ("eval {ckpt} --data {data} --max-tokens 0", ["--max-tokens"]),
    ("eval {ckpt} --data {data} --seq-len 512", ["--seq-len 512", "its context is 256 tokens"]),
    ("eval {root}/no_fields --data {data}", ["config.json lacks vocab_size, hidden_size"]),
    ("eval {root}/a_list --data {data}", ["config.json must hold a JSON object"]),
    ("eval {ckpt} --data {corpus}", ["no meta.json"]),
    ("generate {ckpt} --prompt hi --temperature nan", ["--temperature", "finite"]),
    ("generate {ckpt} --prompt hi --temperature 1e-300", ["--temperature", "0 (greedy) or >= 0.0001"]),
    ("generate {ckpt} --prompt hi --top-k -1", ["--top-k", ">= 0"]),
    ("generate {ckpt} --prompt hi --top-p 0", ["--top-p", "in (0, 1]"]),
    ("generate {ckpt} --prompt hi --top-p 1.5", ["--top-p", "in (0, 1]"]),
    ("generate {ckpt} --prompt hi --max-new-tokens -1", ["--max-new-tokens"]),
    ("generate {ckpt} --prompt hi --repetition-penalty 0", ["--repetition-penalty", "> 0"]),
    ("import {root}/no_fields --out {out}", ["config.json lacks vocab_size, hidden_size"]),
    ("import {root}/a_list --out {out}", ["must hold a JSON object"]),
    ("export {ckpt} --out {file}/sub", ["--out", "is a file"]),
    ("prepare --source {corpus} --tokenizer {tok} --out {out} --val-fraction 1.5", ["--val-fraction", "[0, 1]"]),
    ("prepare --source {corpus} --tokenizer {file} --out {out}", ["tokenizer"]),
    ("tokenizer train --source {corpus} --vocab-size 0 --out {out}", ["--vocab-size"]),
    ("report {ckpt} --out {out} --max-batches 0", ["--max-batches"]),
    ("demo {ckpt} --port 70000", ["--port", "[1, 65535]"]),
    ("generate {ckpt} --prompt hi --device gpu", ["--device", "cuda:N"]),
    ("tasks next-line --data {data} --out {file}/x.jsonl", ["--out", "is a file, not a directory"]),
    ("tasks next-line --data {data} --out {out}.jsonl --items 0", ["--items"]),
    ("train --config {corpus}", ["cannot read config file", "directory"]),
    ("train --config {root}/latin1.yaml", ["not UTF-8 text"]),
    ("prepare --source {corpus} --tokenizer {root}/bad_tok --out {out}", ["not a valid tokenizers JSON file"]),
    ("import {ckpt} --out {out} --tokenizer {root}/bad_tok", ["not a valid tokenizers JSON file"]),
    ("eval {ckpt} --data {root}/list_data", ["not a smoltrain prepared dataset"]),
]


@pytest.mark.parametrize("command,needles", CLI_BAD, ids=[" ".join(w for w in c.split() if "{" not in w)
                                                          for c, _ in CLI_BAD])
def test_cli_refuses_before_any_work(files, tmp_path, monkeypatch, command, needles):
    from tests.conftest import assert_user_error, run_cli

    monkeypatch.setenv("SMOLTRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    before = sorted(p.relative_to(files["root"]) for p in files["root"].rglob("*"))
    proc = run_cli(*command.format(out=out, **files).split())
    assert_user_error(proc, *needles)
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert sorted(p.relative_to(files["root"]) for p in files["root"].rglob("*")) == before


def test_gguf_missing_fields_named():
    from pathlib import Path

    from smoltrain.hf.gguf import _gguf_config

    class Field:  # what GGUFReader's fields hold: .contents() gives the value
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    fields = {"general.architecture": Field("llama"), "llama.block_count": Field(2)}
    with pytest.raises(UserError, match="lacks the GGUF fields llama.attention.head_count, llama.embedding_length"):
        _gguf_config(fields, [], Path("model.gguf"))


WRONG_PATHS = [
    ("generate {missing} --prompt hi", "does not exist"),
    ("generate {ckpt} --prompt hi --top-p 0", "--top-p"),
    ("export {missing} --out {out}", "does not exist"),
    ("export {empty} --format gguf --out {out}.gguf", "not a smoltrain checkpoint"),
    ("export {norun} --space {out}", "no valid checkpoint yet"),
    ("eval {ckpt} {missing} --data {out}", "does not exist"),
]


@pytest.mark.parametrize("command,needle", WRONG_PATHS, ids=[c.split()[0] + str(i) for i, (c, _) in
                                                            enumerate(WRONG_PATHS)])
def test_a_wrong_model_path_is_refused_before_torch_is_imported(tiny_ckpt, tmp_path, command, needle):
    """Importing torch takes seconds; a mistyped path or flag answers without it (every model of `eval`
    checked before any work)."""
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    (tmp_path / "norun" / "checkpoints").mkdir(parents=True)
    args = command.format(missing=tmp_path / "missing", ckpt=tiny_ckpt, out=tmp_path / "out", empty=tmp_path / "empty",
                          norun=tmp_path / "norun").split()
    probe = ("import runpy, sys\nsys.argv = ['smoltrain', *sys.argv[1:]]\ntry:\n"
             "    runpy.run_module('smoltrain', run_name='__main__')\nfinally:\n"
             "    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "torch imported: False" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
