"""The trainer: exact resume after kill -9, gradient accumulation, clean refusals, signals, NaN stops."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smoltrain.config import load_config
from smoltrain.train.trainer import Trainer

from .conftest import DEBUG_TINY, assert_user_error, run_cli


def train(run_dir: Path, tiny_data: list[str], *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}",
            *tiny_data, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def losses(run_dir: Path) -> list[tuple]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]


def _data_dir(tiny_data: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in tiny_data if a.startswith("run.data_dir="))) / "tiny"


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, tiny_data, optimizer):
    opt = ["--set", f"optim.name={optimizer}"]
    straight = train(tmp_path / "a", tiny_data, *opt)
    assert straight.returncode == 0, straight.stderr
    killed = train(tmp_path / "b", tiny_data, *opt, env={"SMOLTRAIN_FAULT": "after_step=14"})
    assert killed.returncode == -signal.SIGKILL
    resumed = train(tmp_path / "b", tiny_data, *opt)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and "step_00000010 (step 10)" in resumed.stdout
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 33 and a == b  # 30 train steps + 3 evals, floats compared exactly


def test_kill_inside_save_keeps_previous_checkpoint(tmp_path, tiny_data):
    killed = train(tmp_path / "r", tiny_data, env={"SMOLTRAIN_FAULT": "in_save=20"})
    assert killed.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert "step_00000010" in names and "step_00000020" not in names
    resumed = train(tmp_path / "r", tiny_data)
    assert resumed.returncode == 0 and "(step 10)" in resumed.stdout
    assert not any(n.startswith(".staging") for n in os.listdir(tmp_path / "r" / "checkpoints"))


def _run_in_process(run_dir, tiny_data, *sets):
    pairs = [s for s in tiny_data if s != "--set"] + list(sets) + [f"run.dir={run_dir}", "checkpoint.every=0"]
    cfg = load_config(DEBUG_TINY, pairs)
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_grad_accumulation_matches_big_batch(tmp_path, tiny_data):
    a = _run_in_process(tmp_path / "a", tiny_data, "train.micro_batch_size=2", "train.grad_accum_steps=4",
                        "train.max_steps=3")
    b = _run_in_process(tmp_path / "b", tiny_data, "train.micro_batch_size=8", "train.grad_accum_steps=1",
                        "train.max_steps=3")
    def curve(run):  # loss and grad norm: both scale with a wrong token average (Adam's update would not)
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [v for r in recs if "loss" in r for v in (r["loss"], r["grad_norm"])]

    ca, cb = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert len(ca) == 6 and ca == pytest.approx(cb, rel=1e-5)
    for (n, p), q in zip(a.raw_model.named_parameters(), b.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n  # Adam turns float-order noise into ~1e-6


def test_bad_configs_exit_2_and_damage_nothing(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert train(run, tiny_data, "--set", "train.max_steps=10").returncode == 0
    before = tree_hash(run)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {max_steps: [1,\n")
    cases = [
        (["--config", str(bad_yaml)], "malformed yaml"),
        (["--set", "train.max_stepz=3"], "unknown key 'train.max_stepz'"),
        (["--set", "train.max_steps=many"], "train.max_steps must be int"),
        (["--set", "train.seq_len=100000"], "max_position_embeddings"),
        (["--set", "train.seed=7"], "train.seed"),  # changes the trajectory of an existing run
        (["--set", f"train.resume_from={tmp_path / 'nope'}"], "does not exist"),
    ]
    for extra, needle in cases:
        args = ["train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run}",
                *[a for a in tiny_data], *extra]
        if extra[0] == "--config":
            args = ["train", *extra, "--set", f"run.dir={run}"]
        assert_user_error(run_cli(*args), needle)
    assert tree_hash(run) == before


def test_extend_a_finished_run(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert train(run, tiny_data, "--set", "train.max_steps=10").returncode == 0
    again = train(run, tiny_data, "--set", "train.max_steps=10")
    assert again.returncode == 0 and "already at step 10" in again.stdout
    more = train(run, tiny_data, "--set", "train.max_steps=14", "--set", "optim.decay_start_step=8")
    assert more.returncode == 0 and "(step 10)" in more.stdout
    assert losses(run)[-2][0] == 14 and (run / "checkpoints" / "step_00000014").is_dir()


def sigterm_a_long_run(run: Path, tiny_data: list[str], *overrides: str, env: dict | None = None
                       ) -> tuple[subprocess.Popen, str, str]:
    """Start an endless debug-tiny run, SIGTERM it once it logs, wait; (process, stdout, stderr)."""
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run}",
            *tiny_data, "--set", "train.max_steps=100000", "--set", "checkpoint.every=0",
            *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def test_sigterm_saves_then_exits(tmp_path, tiny_data):
    run = tmp_path / "run"
    proc, out, err = sigterm_a_long_run(run, tiny_data)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: saved" in out
    steps = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(steps) == 1 and int(steps[0][5:]) >= 1


def test_nonfinite_loss_stops_before_the_update(tmp_path, tiny_data):
    run = tmp_path / "run"
    proc = train(run, tiny_data, "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0",
                 "--set", "checkpoint.every=1", "--set", "optim.grad_clip=0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Non-finite" in proc.stderr and "at step" in proc.stderr
    bad_step = int(proc.stderr.split("at step ")[1].split()[0])
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept and int(kept[-1][5:]) == bad_step - 1  # nothing written at or after the bad step


def test_wsd_cooldown_branch_and_hf_checkpoint_export(tmp_path, tiny_data):
    stable = tmp_path / "stable"
    assert train(stable, tiny_data, "--set", "optim.schedule=constant", "--set", "train.max_steps=20").returncode == 0
    branch = tmp_path / "cooldown"
    src = stable / "checkpoints" / "step_00000010"
    proc = train(branch, tiny_data, "--set", f"train.resume_from={src}", "--set", "optim.schedule=wsd",
                 "--set", "optim.decay_start_step=10", "--set", "optim.decay_steps=6", "--set", "train.max_steps=16",
                 "--set", "checkpoint.export_hf=true")
    assert proc.returncode == 0, proc.stderr
    assert f"Resuming from {src} (step 10)" in proc.stdout
    recs = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert [r["step"] for r in recs] == list(range(11, 17)) and recs[-1]["lr"] == 0.0
    assert recs[0]["lr"] < 3e-3  # decaying from the branch point on
    hf = branch / "checkpoints" / "step_00000016" / "hf"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True)
    assert model.config.num_hidden_layers == 2 and (hf / "tokenizer.json").exists()


def test_continued_pretraining_from_imported_weights(tmp_path, tiny_data, tiny_ckpt):
    run = tmp_path / "cont"
    proc = train(run, tiny_data, "--set", f"train.init_from={tiny_ckpt}", "--set", "train.max_steps=2",
                 "--set", "model.max_position_embeddings=256")
    assert proc.returncode == 0, proc.stderr
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    fresh = train(tmp_path / "fresh", tiny_data, "--set", "train.max_steps=2", "--set", "train.seed=5",
                  "--set", "model.max_position_embeddings=256")
    fresh_first = json.loads((tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()[0])
    assert fresh.returncode == 0
    from smoltrain.data.loader import PackedLoader
    from smoltrain.hf.interop import load_model

    model, _, _ = load_model(tiny_ckpt)
    loader = PackedLoader({"tiny": _data_dir(tiny_data)}, batch_size=4, seq_len=64, seed=1337)
    w = loader.next_batch()
    with torch.no_grad():
        expected = model(w[:, :-1], labels=w[:, 1:]).item()
    assert first["loss"] == pytest.approx(expected, abs=1e-5)  # training started from the imported weights
    assert fresh_first["loss"] != pytest.approx(expected, abs=1e-3)
    shape = train(tmp_path / "bad", tiny_data, "--set", f"train.init_from={tiny_ckpt}",
                  "--set", "model.hidden_size=128")
    assert shape.returncode == 2 and "another shape" in shape.stderr


def test_eval_command_defaults_equal_the_in_loop_numbers(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert train(run, tiny_data, "--set", "train.max_steps=10").returncode == 0
    data = _data_dir(tiny_data)
    proc = run_cli("eval", run, "--data", data, "--json")  # defaults: the run's seq_len, the whole split
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rec = next(r for r in recs if r.get("val_loss") is not None and r["step"] == 10)
    assert res["loss"] == pytest.approx(rec["val_loss"], rel=1e-6) and res["bpb"] == pytest.approx(rec["val_bpb"], rel=1e-6)
    assert rec["val/tiny/loss"] == rec["val_loss"] and rec["val/tiny/bpb"] == rec["val_bpb"]  # one dataset
    val_tokens = json.loads((data / "meta.json").read_text())["splits"]["val"]["num_tokens"]
    assert res["tokens"] == rec["val_tokens"] == val_tokens - 1 and res["seq_len"] == 64  # every token once
    assert res["ppl"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
    sample = json.loads(run_cli("eval", run, "--data", data, "--json", "--max-tokens", "128").stdout)
    assert sample["tokens"] == 128 and sample["loss"] != res["loss"]
    table = run_cli("eval", run, run / "checkpoints" / "step_00000010", "--data", data, "--seq-len", "64")
    assert table.returncode == 0 and table.stdout.count("\n") == 3
    assert_user_error(run_cli("eval", run, "--data", data, "--seq-len", "5000"), "context", "256")
    assert_user_error(run_cli("eval", run, "--data", tmp_path / "nope"), "nope")


def test_in_loop_eval_per_dataset_with_an_eval_only_dataset(tmp_path, tiny_data):
    from .conftest import make_corpus_text

    corpus = next(a for a in tiny_data if a.startswith("data.datasets=")).split("sources: ['")[1].split("'")[0]
    probe = tmp_path / "probe"
    probe.mkdir()
    for i, doc in enumerate(make_corpus_text(3, seed=11, words_per_doc=(100, 150))):
        (probe / f"p{i}.txt").write_text(doc)
    datasets = f"data.datasets=[{{name: tiny, sources: ['{corpus}']}}, {{name: probe, sources: ['{probe}'], val_fraction: 1.0}}]"
    run = tmp_path / "run"
    proc = train(run, tiny_data, "--set", datasets, "--set", f"run.data_dir={tmp_path / 'data'}",
                 "--set", "train.max_steps=4", "--set", "eval.every=4")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in recs if r.get("val_loss") is not None)
    n = {name: ev[f"val/{name}/tokens"] for name in ("tiny", "probe")}
    probe_meta = json.loads((tmp_path / "data" / "probe" / "meta.json").read_text())
    assert n["probe"] == probe_meta["splits"]["val"]["num_tokens"] - 1 and ev["val_tokens"] == sum(n.values())
    weighted = sum(ev[f"val/{k}/loss"] * v for k, v in n.items()) / sum(n.values())
    assert ev["val_loss"] == pytest.approx(weighted, rel=1e-9)  # the total is token-weighted
    steps = [r for r in recs if r.get("tokens_per_source")]
    assert steps and all(set(r["tokens_per_source"]) == {"tiny"} for r in steps)  # never trained on probe


@pytest.mark.slow
def test_chaos_random_kills_give_the_same_curve(tmp_path, tiny_data):
    import random

    extra = ["--set", "train.max_steps=40", "--set", "checkpoint.every=5", "--set", "checkpoint.keep_last=2"]
    assert train(tmp_path / "ref", tiny_data, *extra).returncode == 0
    rng = random.Random(0)
    faults = [f"after_step={rng.randint(1, 12)}", f"in_save={rng.choice([15, 20])}",
              f"after_step={rng.randint(21, 29)}", f"after_step={rng.randint(31, 39)}"]
    run, kills = tmp_path / "chaos", 0
    for fault in faults:
        proc = train(run, tiny_data, *extra, env={"SMOLTRAIN_FAULT": fault})
        kills += proc.returncode == -signal.SIGKILL
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run}",
            *tiny_data, *extra]
    for _ in range(2):  # kills at arbitrary moments, wherever the process happens to be
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 6.0))
        p.kill()
        kills += p.wait() == -signal.SIGKILL
    assert kills >= 4
    assert train(run, tiny_data, *extra).returncode == 0
    assert losses(run) == losses(tmp_path / "ref")


def test_streaming_run_resumes_exactly(tmp_path, tiny_data):
    extra = ["--set", "data.streaming=true", "--set", "train.max_steps=12", "--set", "checkpoint.every=5"]
    assert train(tmp_path / "a", tiny_data, *extra).returncode == 0
    killed = train(tmp_path / "b", tiny_data, *extra, env={"SMOLTRAIN_FAULT": "after_step=8"})
    assert killed.returncode == -signal.SIGKILL
    resumed = train(tmp_path / "b", tiny_data, *extra)
    assert resumed.returncode == 0 and "(step 5)" in resumed.stdout, resumed.stderr
    a = [r for r in losses(tmp_path / "a") if r[1] is not None]
    assert len(a) == 12 and a == [r for r in losses(tmp_path / "b") if r[1] is not None]


def test_eval_any_hf_causal_lm_beside_ours(tmp_path, tiny_data, tiny_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from smoltrain.data.tokenizer import load_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    load_tokenizer(tiny_tokenizer_dir).save(gpt2)
    run = tmp_path / "run"
    assert train(run, tiny_data, "--set", "train.max_steps=10").returncode == 0
    proc = run_cli("eval", run, gpt2, "--data", _data_dir(tiny_data), "--seq-len", "64", "--max-tokens", "512",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [Path(r["model"]).name for r in rows] == ["step_00000010", "gpt2"]
    assert rows[0]["loss"] < rows[1]["loss"]  # trained beats random, on the same windows


def test_fp16_with_grad_scaler_trains_and_resumes(tmp_path, tiny_data):
    """The scaler's steps update the weights (the loss falls), its state is saved and restored (its count
    of finite steps since the last change goes on across the resume), and a resumed fp16 run is the
    uninterrupted one."""
    run, common = tmp_path / "f16", ["--set", "train.dtype=fp16", "--set", "checkpoint.every=2"]
    assert train(run, tiny_data, *common, "--set", "train.max_steps=4").returncode == 0

    def scaler(run_dir: Path, step: int) -> dict:
        return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "extra.json").read_text())["scaler"]

    assert scaler(run, 4)["scale"] == 2.0 ** 16 and scaler(run, 4)["_growth_tracker"] == 4  # no overflow yet
    more = train(run, tiny_data, *common, "--set", "train.max_steps=6")
    assert more.returncode == 0 and "(step 4)" in more.stdout
    assert scaler(run, 6)["_growth_tracker"] == 6
    whole = tmp_path / "whole"
    assert train(whole, tiny_data, *common, "--set", "train.max_steps=6").returncode == 0
    def step_losses(run_dir: Path) -> list[float]:  # (the interrupted run also evaluated at its end, step 4)
        return [r[1] for r in losses(run_dir) if r[1] is not None]

    assert step_losses(run) == step_losses(whole) and scaler(whole, 6) == scaler(run, 6)
    steps = step_losses(whole)
    assert len(steps) == 6 and steps[-1] < steps[0] - 0.2, steps  # the updates were applied
