"""One process per run dir (an OS lock), signals that never cost a checkpoint, a refusal to start fresh
that persists, and resumes with changed settings that are shown and recorded."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smoltrain.checkpoint.rundir import LOCK_NAME, RunLock, sees_lock
from smoltrain.errors import UserError

from .conftest import DEBUG_TINY

SHORT = ["--set", "train.max_steps=12", "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=0",
         "--set", "eval.every=4"]


def command(run_dir: Path, tiny_data: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}",
            *tiny_data, *extra]


def train(run_dir: Path, tiny_data: list[str], *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"SMOLTRAIN_FAULT": fault} if fault else {})}
    return subprocess.run(command(run_dir, tiny_data, *extra), capture_output=True, text=True, timeout=300, env=env)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records(run_dir)]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def aside(run_dir: Path) -> list[str]:
    """Anything moved out of discovery's sight: must stay empty when nothing was corrupt."""
    root = run_dir / "checkpoints"
    return [p.name for p in root.iterdir() if p.name.startswith(".corrupt")] if root.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = train(run, tiny_data, *SHORT)
    assert proc.returncode == 0, proc.stderr
    return run


def test_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert sees_lock(tmp_path, first.token)  # what every torchrun rank checks: the same run dir
    assert not sees_lock(tmp_path / "elsewhere", first.token) and not sees_lock(tmp_path, "another token")
    with pytest.raises(UserError, match=f"PID {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / LOCK_NAME).read_bytes() == b""  # a clean exit leaves no holder record
    RunLock(tmp_path).acquire().release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from smoltrain.checkpoint.rundir import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"PID {holder.pid} "):
        RunLock(tmp_path).acquire()
    holder.kill()  # kill -9: the kernel drops the lock, nothing stale is left
    holder.wait()
    RunLock(tmp_path).acquire().release()


def _wait_stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "T":
            return
        time.sleep(0.1)
    raise AssertionError("the first trainer never reached its pause point")


def test_second_trainer_on_a_live_run_dir_exits_2_and_harms_nothing(tmp_path, tiny_data, reference):
    run = tmp_path / "run"
    env = {**os.environ, "SMOLTRAIN_FAULT": "after_step=5:stop"}  # pauses itself, holding the lock
    first = subprocess.Popen(command(run, tiny_data, *SHORT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        _wait_stopped(first.pid)
        for extra in ([], ["--set", "train.seed=7"]):  # the same run, and one its config would refuse
            second = train(run, tiny_data, *SHORT, *extra)
            assert second.returncode == 2, second.stderr
            assert f"PID {first.pid} on host {socket.gethostname()}" in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps = train_steps(run)
    assert steps == sorted(set(steps)) == list(range(1, 13))
    assert aside(run) == []
    assert curve(run) == curve(reference)


def test_signals_inside_and_right_after_a_save_cost_nothing(tmp_path, tiny_data, reference):
    run = tmp_path / "run"
    after = train(run, tiny_data, *SHORT, fault="after_step=4:term")  # step 4's save is due: saved once
    assert after.returncode == 128 + signal.SIGTERM, after.stderr
    assert "SIGTERM: saved" in after.stdout and "step_00000004 (step 4)" in after.stdout
    doubled = train(run, tiny_data, *SHORT, fault="in_save=8:term,in_save=8:int")
    assert doubled.returncode == 128 + signal.SIGTERM, doubled.stderr
    assert "SIGINT again: saving step 8, please wait" in doubled.stderr
    assert "(step 4)" in doubled.stdout and "step_00000008 (step 8)" in doubled.stdout
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step_{s:08d}" for s in (2, 4, 6, 8)]  # nothing aside, no staging left
    off = train(run, tiny_data, *SHORT, fault="after_step=9:int")  # between scheduled saves: step 9 is saved
    assert off.returncode == 128 + signal.SIGINT and "step_00000009 (step 9)" in off.stdout, off.stderr
    assert aside(run) == [] and len(list((run / "checkpoints").iterdir())) == 5
    assert train(run, tiny_data, *SHORT).returncode == 0
    assert curve(run) == curve(reference)


def test_held_down_ctrl_c_after_a_sigterm_never_kills_the_stopping_run(tmp_path, tiny_data, reference):
    """SIGINT every 2 ms from the first signal to the exit: those landing in Python's own teardown (which
    puts back the default handlers) killed the process with -2 in CI; the exit must stay 143."""
    run, err_path = tmp_path / "run", tmp_path / "stderr.txt"
    env = {**os.environ, "SMOLTRAIN_FAULT": "after_step=4:term"}
    with err_path.open("w") as err:  # a file, not a pipe: the storm's messages must never block the child
        p = subprocess.Popen(command(run, tiny_data, *SHORT), stdout=subprocess.PIPE, stderr=err, text=True,
                             env=env)
        deadline = time.time() + 120
        while p.poll() is None and "SIGTERM:" not in err_path.read_text() and time.time() < deadline:
            time.sleep(0.001)
        storm = 0
        while p.poll() is None:
            p.send_signal(signal.SIGINT)
            storm += 1
            time.sleep(0.002)
        out = p.stdout.read()
    text = err_path.read_text()
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, storm, text)
    assert storm > 0 and "SIGINT again" in text and "Traceback" not in text, text
    assert "step_00000004 (step 4)" in out
    assert train(run, tiny_data, *SHORT).returncode == 0
    assert curve(run) == curve(reference)


def _corrupt_every_checkpoint(run: Path) -> None:
    for ckpt in (run / "checkpoints").iterdir():
        weights = ckpt / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))


def test_refusal_to_start_fresh_persists_until_asked(tmp_path, tiny_data):
    run, extra = tmp_path / "run", ["--set", "train.max_steps=6", "--set", "checkpoint.every=3"]
    assert train(run, tiny_data, *extra).returncode == 0
    _corrupt_every_checkpoint(run)
    metrics = (run / "metrics.jsonl").read_text()
    for _ in range(2):  # the second run must refuse too, though the bad ones are now set aside
        proc = train(run, tiny_data, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "refusing to start fresh" in proc.stderr and "train.start_fresh=true" in proc.stderr
        assert (run / "metrics.jsonl").read_text() == metrics
    assert len(aside(run)) == 2
    fresh = train(run, tiny_data, *extra, "--set", "train.start_fresh=true")
    assert fresh.returncode == 0 and "Resuming" not in fresh.stdout, fresh.stderr
    assert train_steps(run) == list(range(1, 7)) and len(aside(run)) == 2  # the bad ones are kept


def test_resume_with_another_lr_prints_the_diff_and_keeps_history(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert train(run, tiny_data, "--set", "train.max_steps=6", "--set", "checkpoint.every=3").returncode == 0
    more = train(run, tiny_data, "--set", "train.max_steps=8", "--set", "checkpoint.every=3",
                 "--set", "optim.lr=0.001", "--set", "optim.weight_decay=0.0")
    assert more.returncode == 0, more.stderr
    assert "Settings changed since step 6: " in more.stdout
    assert "optim.lr: 0.003 -> 0.001" in more.stdout and "train.max_steps: 6 -> 8" in more.stdout
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["start_step"] for h in history] == [0, 6]
    assert history[0]["config"]["optim"]["lr"] == 0.003 and history[1]["config"]["optim"]["lr"] == 0.001
    assert "optim.lr: 0.003 -> 0.001" in history[1]["changes"] and history[0]["changes"] == []
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert [r["lr"] for r in records(run) if r.get("step") == 8 and "lr" in r] != []


@pytest.mark.slow
def test_eight_random_signals_never_cost_a_checkpoint(tmp_path, tiny_data):
    extra = ["--set", "train.max_steps=24", "--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=2",
             "--set", "eval.every=6"]
    ref = tmp_path / "ref"
    assert train(ref, tiny_data, *extra).returncode == 0
    run, rng = tmp_path / "chaos", random.Random(11)
    for i in range(8):
        ckpts = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
        done = int(ckpts[-1].name[5:]) if ckpts else 0
        sigs = [rng.choice([signal.SIGTERM, signal.SIGINT]) for _ in range(rng.choice([1, 2]))]
        if i % 2 == 0:  # at an exact point: after a step (its save follows) or inside the save
            point = f"{rng.choice(['after_step', 'in_save'])}={done + rng.randint(1, 2)}"
            spec = ",".join(f"{point}:{'term' if s == signal.SIGTERM else 'int'}" for s in sigs)
            proc = train(run, tiny_data, *extra, fault=spec)
            rc, err = proc.returncode, proc.stderr
        else:  # from outside, wherever the loop happens to be
            p = subprocess.Popen(command(run, tiny_data, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
            deadline = time.time() + 120
            while time.time() < deadline and not ((run / "metrics.jsonl").exists() and train_steps(run)
                                                  and train_steps(run)[-1] > done):
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.4))
            for s in sigs:
                p.send_signal(s)
                time.sleep(rng.uniform(0, 0.05))
            rc, err = p.wait(timeout=300), p.stderr.read()
        assert rc in (0, *(128 + s for s in sigs)), (i, rc, err)  # two pending at once: the lower runs first
        assert "Traceback" not in err, err
        assert aside(run) == [], (i, err)
        steps = train_steps(run)
        assert steps == sorted(set(steps)), steps
    final = train(run, tiny_data, *extra)
    assert final.returncode == 0, final.stderr
    assert curve(run) == curve(ref)
