"""torchrun faults on CPU (gloo, 2 processes): a SIGKILLed worker under --max-restarts resumes by itself,
and SIGTERM to the launcher saves one checkpoint of the same step on every rank; both end equal to an
uninterrupted run, every time."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import DEBUG_TINY

STEPS = ["--set", "train.max_steps=14", "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=0",
         "--set", "eval.every=0", "--set", "eval.prompts=[]", "--set", "train.micro_batch_size=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(run_dir: Path, tiny_data: list[str], restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "-m", "smoltrain", "train", "--config", str(DEBUG_TINY),
            "--set", f"run.dir={run_dir}", *tiny_data, *STEPS]


def curve(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == sorted(set(steps)), steps  # no step logged twice
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while last_step(run_dir) < step:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the fault could be injected"
        time.sleep(0.05)


def workers(launcher: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data) -> dict[int, float]:
    run = tmp_path_factory.mktemp("ddp_ref") / "run"
    proc = subprocess.run(torchrun(run, tiny_data), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = curve(run)
    assert sorted(ref) == list(range(1, 15))
    return ref


@pytest.mark.slow
def test_sigkilled_worker_restarts_and_resumes_3_of_3(tmp_path, tiny_data, reference):
    rng = random.Random(5)
    for trial in range(3):
        run = tmp_path / f"kill{trial}"
        proc = subprocess.Popen(torchrun(run, tiny_data, restarts=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV)
        wait_for_step(proc, run, rng.randint(3, 9))
        os.kill(rng.choice(workers(proc.pid)), signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (trial, err[-4000:])
        assert out.count("Resuming from") == 1, (trial, out[-3000:], err[-5000:])
        assert curve(run) == reference, trial


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_resumes_3_of_3(tmp_path, tiny_data, reference):
    rng = random.Random(6)
    for trial in range(3):
        run = tmp_path / f"term{trial}"
        proc = subprocess.Popen(torchrun(run, tiny_data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)
        wait_for_step(proc, run, rng.randint(3, 9))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
        assert "SIGTERM: saved" in out, (trial, out[-2000:], err[-4000:])
        saved = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
        assert saved == last_step(run)  # the step every rank agreed on, saved once
        names = {p.name for p in (run / "checkpoints").iterdir()}
        assert names == {f"step_{s:08d}" for s in [*range(2, saved, 2), saved]}, names  # nothing aside or staged
        again = subprocess.run(torchrun(run, tiny_data), capture_output=True, text=True, timeout=600, env=ENV)
        assert again.returncode == 0 and f"(step {saved})" in again.stdout, (trial, again.stderr[-4000:])
        assert curve(run) == reference, trial
