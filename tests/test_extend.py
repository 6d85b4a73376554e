"""Extending a finished run: the re-warmup ramp, exact on resume; a run with nothing to do writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from smoltrain.checkpoint.rundir import LOCK_NAME

from .conftest import DEBUG_TINY


def train(run_dir: Path, tiny_data: list[str], *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}",
            *tiny_data, "--set", "eval.every=0", "--set", "eval.prompts=[]", "--set", "log.every=1",
            "--set", "checkpoint.every=2", *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def lrs(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in recs if "loss" in r}


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file but the run-dir lock, which each train takes (and empties again) to own the run dir."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def test_extension_rewarms_and_a_finished_run_writes_nothing(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert train(run, tiny_data, "train.max_steps=4").returncode == 0
    before = snapshot(run)
    again = train(run, tiny_data, "train.max_steps=4")
    assert again.returncode == 0, again.stderr
    assert "already at step 4 and this config's train.max_steps is 4" in again.stdout
    assert snapshot(run) == before  # no event file, no config rewrite, no log rewind

    extended = train(run, tiny_data, "train.max_steps=8", "optim.rewarmup_steps=3", "optim.schedule=constant")
    assert extended.returncode == 0, extended.stderr
    lr, peak = lrs(run), 3e-3
    assert [round(lr[s] / peak, 6) for s in (5, 6, 7, 8)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 1.0]

    # the same extension killed after step 6 and resumed: the ramp continues exactly
    crash = tmp_path / "crash"
    assert train(crash, tiny_data, "train.max_steps=4").returncode == 0
    killed = train(crash, tiny_data, "train.max_steps=8", "optim.rewarmup_steps=3", "optim.schedule=constant",
                   env={"SMOLTRAIN_FAULT": "after_step=6"})
    assert killed.returncode != 0
    resumed = train(crash, tiny_data, "train.max_steps=8", "optim.rewarmup_steps=3", "optim.schedule=constant")
    assert resumed.returncode == 0, resumed.stderr
    assert lrs(crash) == lr


def test_training_ends_with_a_summary(tmp_path, tiny_data):
    run = tmp_path / "run"
    proc = train(run, tiny_data, "train.max_steps=2", "eval.every=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for needle in ("Done: step 2", "Held-out (step 2): loss", f"checkpoint   {run / 'checkpoints' / 'step_00000002'}",
                   f"metrics      {run / 'metrics.jsonl'}", f"smoltrain generate {run}", f"smoltrain export {run}",
                   f"smoltrain report {run}", f"smoltrain demo {run}"):
        assert needle in out, needle
