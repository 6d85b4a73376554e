"""storage.py and what rests on it: --force replaces only a command's own output, checkpoints never run
code, unreadable state is a user error, the free-space estimate matches the real size, a full disk is a
clean exit 1 with the previous checkpoint intact."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smoltrain import storage
from smoltrain.checkpoint import optimizer as optimstate
from smoltrain.checkpoint import state as ck
from smoltrain.checkpoint.discovery import step_dir
from smoltrain.cli import main as cli_main
from smoltrain.data.tokenizer import TOKENIZER_FILES
from smoltrain.errors import TrainingError
from smoltrain.hf import interop as interop
from smoltrain.hf.interop import load_model

from .conftest import DEBUG_TINY, assert_user_error, run_cli
from .test_trainer import tree_hash

STEPS = ["--set", "train.max_steps=4", "--set", "checkpoint.every=2", "--set", "eval.every=0",
         "--set", "eval.prompts=[]", "--set", "checkpoint.export_hf=true"]


def train(run_dir: Path, tiny_data: list[str], *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}",
            *tiny_data, *STEPS, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def run4(tmp_path_factory, tiny_data) -> Path:
    """debug-tiny, 4 steps, checkpoints (with an HF copy) at steps 2 and 4."""
    run = tmp_path_factory.mktemp("storage") / "run"
    proc = train(run, tiny_data)
    assert proc.returncode == 0, proc.stderr
    return run


class Payload:
    """Unpickling this writes a marker file: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def copy_checkpoint(run4: Path, dest_run: Path, step: int = 2) -> Path:
    dest = step_dir(dest_run, step)
    shutil.copytree(step_dir(run4, step), dest)
    return dest


def reseal(ckpt: Path) -> None:
    """What an attacker does: rewrite the manifest so every file matches again."""
    (ckpt / storage.MANIFEST).unlink()
    storage.write_manifest(ckpt, "train", {"kind": "train", "step": int(ckpt.name.split("_")[1])})


def plant_payloads(ckpt: Path, marker: Path) -> None:
    data = pickle.dumps(Payload(marker))
    for name in ("rng.pt", "optimizer/.metadata", "pytorch_model.bin", "hf/pytorch_model.bin"):
        (ckpt / name).write_bytes(data)
    reseal(ckpt)


# --- --force -------------------------------------------------------------------------------------------

def test_export_force_never_replaces_the_run_its_checkpoint_or_foreign_files(run4, tmp_path):
    before = tree_hash(run4)
    ckpt = step_dir(run4, 4)
    assert_user_error(run_cli("export", run4, "--out", run4, "--force"), f"--out {run4} is this command's own input")
    assert_user_error(run_cli("export", ckpt, "--out", run4, "--force"), "own input")
    assert_user_error(run_cli("export", ckpt, "--out", ckpt, "--force"), "own input")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert_user_error(run_cli("export", run4, "--out", foreign, "--force"), str(foreign), "even with --force")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert tree_hash(run4) == before  # nothing deleted, nothing changed
    out = tmp_path / "hf"
    assert run_cli("export", run4, "--out", out).returncode == 0
    assert_user_error(run_cli("export", run4, "--out", out), "pass --force")
    (out / "README.md").write_text("edited card")  # still its own file: --force may replace it
    assert run_cli("export", run4, "--out", out, "--force").returncode == 0
    assert (out / "README.md").read_text() != "edited card"
    (out / "notes.txt").write_text("added by hand")
    assert_user_error(run_cli("export", run4, "--out", out, "--force"), "notes.txt")
    assert (out / "notes.txt").exists()


def test_import_never_writes_over_its_source(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    before = tree_hash(src)
    assert_user_error(run_cli("import", src, "--out", src, "--force"), "is this command's own input")
    assert_user_error(run_cli("import", src, "--out", tmp_path, "--force"), "contains this command's own input")
    assert tree_hash(src) == before


def test_publish_commits_atomically_and_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "out"
    with storage.publish(out, "report", hashed=False) as d:
        (d / "index.html").write_text("v1")
        assert d.parent == tmp_path and d.name.startswith(".staging-out-") and not out.exists()
    assert storage.output_record(out)["command"] == "report"
    with pytest.raises(RuntimeError), storage.publish(out, "report", hashed=False, replace=True) as d:
        (d / "index.html").write_text("half")
        raise RuntimeError("died mid-write")
    assert (out / "index.html").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with storage.publish(out, "report", hashed=False, replace=True) as d:
        (d / "index.html").write_text("v2")
    assert (out / "index.html").read_text() == "v2"
    with pytest.raises(storage.UserError, match="output of smoltrain report"):
        storage.check_target(out, "prepare", force=True)


# --- checkpoints never run code --------------------------------------------------------------------------

def test_a_file_is_published_whole_and_a_log_rewound_keeps_its_records(tmp_path, monkeypatch):
    """publish_file leaves the old file in place when the write fails and no temp file either way;
    rewrite_jsonl keeps the records asked for, drops torn lines, appends."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4, "lo')
    storage.rewrite_jsonl(log, lambda r: r["step"] <= 2, [{"step": 9}])
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 9}\n'

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(OSError):
        storage.publish_file(log, "half")
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 9}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_checkpoint_state_is_safetensors_and_json_only(run4):
    ckpt = step_dir(run4, 4)
    names = sorted(storage.read_manifest(ckpt)["files"])
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".metadata"))], names
    for name in names:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(str(ckpt / name))
        elif name.endswith(".json"):
            json.loads((ckpt / name).read_text())


@pytest.mark.slow
def test_tampered_checkpoint_payload_is_never_executed(run4, tmp_path, tiny_data):
    marker = tmp_path / "PWNED"
    resumed = tmp_path / "resumed"
    ckpt = copy_checkpoint(run4, resumed)
    plant_payloads(ckpt, marker)
    proc = train(resumed, tiny_data, "--set", "train.max_steps=3")  # auto-resume
    assert proc.returncode == 0 and "Resuming from" in proc.stdout, proc.stderr
    proc = train(tmp_path / "from", tiny_data, "--set", "train.max_steps=3", "--set", f"train.resume_from={ckpt}")
    assert proc.returncode == 0 and "(step 2)" in proc.stdout, proc.stderr
    proc = train(tmp_path / "init", tiny_data, "--set", "train.max_steps=1", "--set", f"train.init_from={ckpt}")
    assert proc.returncode == 0, proc.stderr
    data = Path(next(a.split("=", 1)[1] for a in tiny_data if a.startswith("run.data_dir="))) / "tiny"
    for args in (["eval", ckpt, "--data", data, "--seq-len", "64", "--max-tokens", "512"],
                 ["export", ckpt, "--out", tmp_path / "hf"],
                 ["import", ckpt / "hf", "--out", tmp_path / "imported"],
                 ["generate", ckpt, "--prompt", "The", "--max-new-tokens", "2"]):
        got = run_cli(*args)
        assert got.returncode == 0, (args, got.stderr)
    # an HF directory whose only weights are a pickle payload: refused, not executed
    hf = tmp_path / "evil_hf"
    shutil.copytree(ckpt / "hf", hf)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    assert_user_error(run_cli("import", hf, "--out", tmp_path / "evil_import"), "pytorch_model.bin")
    assert_user_error(run_cli("eval", hf, "--data", data, "--seq-len", "64"), "pytorch_model.bin")
    assert not marker.exists()


def test_pickle_format_checkpoint_is_refused_not_unpickled(run4, tmp_path, tiny_data):
    marker = tmp_path / "PWNED"
    run = tmp_path / "old"
    ckpt = copy_checkpoint(run4, run)
    for name in (ck.RNG_TENSORS, ck.RNG_JSON, f"{optimstate.OPTIMIZER_DIR}/{optimstate.OPTIM_TENSORS}"):
        (ckpt / name).unlink()
    plant_payloads(ckpt, marker)
    assert_user_error(train(run, tiny_data), "older smoltrain", "pickles", "train.init_from")
    assert not marker.exists()


def test_unreadable_rng_or_optimizer_state_exits_2(run4, tmp_path, tiny_data):
    for name, needle in ((ck.RNG_TENSORS, "trainer state is missing or unreadable"),
                         (ck.RNG_JSON, "trainer state is missing or unreadable"),
                         (f"{optimstate.OPTIMIZER_DIR}/{optimstate.OPTIM_TENSORS}", "optimizer state")):
        run = tmp_path / name.replace("/", "_")
        ckpt = copy_checkpoint(run4, run)
        (ckpt / name).write_bytes(b"\x00garbage that matches the manifest once it is resealed")
        reseal(ckpt)
        assert_user_error(train(run, tiny_data), needle, str(ckpt))


def test_rng_state_roundtrips_exactly():
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    tensors, plain = ck.rng_state()
    json.loads(json.dumps(plain))  # JSON through and through
    want = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(tensors, json.loads(json.dumps(plain)))
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1] and np.random.rand() == want[2]


# --- disk space ---------------------------------------------------------------------------------------

def _estimate(ckpt: Path, export_hf: bool) -> int:
    model, tok, _ = load_model(ckpt)
    tok_bytes = sum((tok.directory / n).stat().st_size for n in TOKENIZER_FILES if (tok.directory / n).exists())
    return ck.checkpoint_bytes({n: p.numel() for n, p in model.named_parameters()}, export_hf, tok_bytes)


def test_first_free_space_estimate_is_within_2_percent_of_the_real_size(run4, tmp_path):
    ckpt = step_dir(run4, 4)
    real = storage.tree_size(ckpt)
    est = _estimate(ckpt, export_hf=True)
    assert abs(est - real) / real < 0.02, (est, real)
    plain = tmp_path / "plain"  # the same checkpoint as a save without checkpoint.export_hf writes it
    shutil.copytree(ckpt, plain, ignore=shutil.ignore_patterns("hf"))
    reseal_as = storage.read_manifest(ckpt)
    (plain / storage.MANIFEST).unlink()
    storage.write_manifest(plain, "train", {"kind": "train", "step": reseal_as["step"]})
    real = storage.tree_size(plain)
    assert abs(_estimate(ckpt, export_hf=False) - real) / real < 0.02


def test_free_space_message_uses_readable_units(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda _: usage(10 * 2**20, 9 * 2**20, 3 * 2**20 // 2))
    with pytest.raises(TrainingError) as e:
        ck.check_free_space(tmp_path, 5 * 2**20, 0.0)
    assert "1.5 MiB free, about 5.0 MiB needed" in str(e.value) and "0.00 GiB" not in str(e.value)
    assert [storage.format_bytes(n) for n in (512, 3 * 2**10, 2**30 * 1.25)] == ["512 B", "3.0 KiB", "1.25 GiB"]


def _assert_clean_disk_full_exit(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "no space left on device" in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr


def test_disk_full_during_save_or_logging_exits_1_with_previous_checkpoint_intact(run4, tmp_path, tiny_data):
    run = tmp_path / "full"
    shutil.copytree(run4, run)
    shutil.rmtree(step_dir(run, 4))
    keep = tree_hash(step_dir(run, 2))
    for fault in ("in_save=4:enospc", "in_log=3:enospc"):
        _assert_clean_disk_full_exit(train(run, tiny_data, env={"SMOLTRAIN_FAULT": fault}))
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # no staging debris
        assert tree_hash(step_dir(run, 2)) == keep
        storage.verify_manifest(step_dir(run, 2))


def test_disk_full_in_prepare_and_export_exits_1_and_leaves_nothing(tmp_path, monkeypatch, bpe_dir, tiny_ckpt,
                                                                    capsys):
    from smoltrain.data import shards

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some words to tokenize " * 50)
    monkeypatch.setattr(shards.ShardWriter, "write", full)
    rc = cli_main(["prepare", "--source", str(tmp_path / "texts"), "--tokenizer", str(bpe_dir), "--out",
                   str(tmp_path / "data"), "--num-proc", "1", "--no-progress"])
    assert rc == 1 and "no space left on device" in capsys.readouterr().err
    monkeypatch.undo()

    def full_safetensors(*_args, **_kwargs):  # what safetensors raises: not an OSError
        raise Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(interop, "save_file", full_safetensors)
    assert cli_main(["export", str(tiny_ckpt), "--out", str(tmp_path / "hf")]) == 1
    assert "no space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]  # no output, no staging
