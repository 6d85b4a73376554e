"""torchrun on CPU (gloo): DDP and FSDP2 match one process with the same global batch; FSDP checkpoints
reshard across world sizes; bad launches are user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import DEBUG_TINY, assert_user_error, run_cli

STEPS = ["--set", "train.max_steps=8", "--set", "checkpoint.every=4", "--set", "eval.every=0",
         "--set", "eval.prompts=[]"]


def launch(run_dir, tiny_data, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}", *tiny_data, *STEPS, *extra]
    if nproc == 0:
        cmd = [sys.executable, "-m", "smoltrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "smoltrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def curve(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_and_fsdp_reshards(tmp_path, tiny_data):
    launch(tmp_path / "one", tiny_data, 0, "--set", "train.global_batch_size=8")  # micro 4 x accum 2
    ref = curve(tmp_path / "one")
    assert len(ref) == 8
    for strategy in ("ddp", "fsdp"):
        out = launch(tmp_path / strategy, tiny_data, 2, "--set", f"parallel.strategy={strategy}",
                     "--set", "train.global_batch_size=8")  # micro 4 x accum 1 x 2 processes
        assert "global batch = micro 4 x accum 1 x world 2" in out.stdout
        got = curve(tmp_path / strategy)
        assert got.keys() == ref.keys()
        assert all(abs(got[s] - ref[s]) < 1e-3 for s in ref), (strategy, got, ref)
    # the FSDP checkpoint of step 4, written by 2 processes, resumes in 1 process and in 2
    src = tmp_path / "fsdp" / "checkpoints" / "step_00000004"
    fsdp = curve(tmp_path / "fsdp")
    for name, nproc, extra in (("r1", 0, []), ("r2", 2, ["--set", "parallel.strategy=fsdp"])):
        out = launch(tmp_path / name, tiny_data, nproc, "--set", f"train.resume_from={src}",
                     "--set", "train.global_batch_size=8", *extra)
        assert "(step 4)" in out.stdout
        got = curve(tmp_path / name)
        assert all(abs(got[s] - fsdp[s]) < 1e-5 for s in (5, 6, 7, 8)), (name, got, fsdp)
    # and exports like any checkpoint
    assert run_cli("export", src, "--out", tmp_path / "hf").returncode == 0


@pytest.mark.slow
def test_muon_ddp_matches_one_process_and_fsdp_runs_and_resumes(tmp_path, tiny_data):
    muon = ["--set", "optim.name=muon", "--set", "train.global_batch_size=8"]
    launch(tmp_path / "one", tiny_data, 0, *muon)
    ref = curve(tmp_path / "one")
    launch(tmp_path / "ddp", tiny_data, 2, "--set", "parallel.strategy=ddp", *muon)
    got = curve(tmp_path / "ddp")
    assert got.keys() == ref.keys() and len(ref) == 8
    assert all(abs(got[s] - ref[s]) < 1e-3 for s in ref), (got, ref)
    launch(tmp_path / "fsdp", tiny_data, 2, "--set", "parallel.strategy=fsdp", *muon)
    fsdp = curve(tmp_path / "fsdp")
    assert all(abs(fsdp[s] - ref[s]) < 1e-3 for s in ref), (fsdp, ref)
    src = tmp_path / "fsdp" / "checkpoints" / "step_00000004"
    out = launch(tmp_path / "r2", tiny_data, 2, "--set", "parallel.strategy=fsdp", "--set", f"train.resume_from={src}",
                 *muon)
    assert "(step 4)" in out.stdout
    resumed = curve(tmp_path / "r2")
    assert all(abs(resumed[s] - fsdp[s]) < 1e-5 for s in (5, 6, 7, 8)), (resumed, fsdp)


def test_bad_launches_exit_2(tmp_path, tiny_data):
    base = ["train", "--config", str(DEBUG_TINY), "--set", f"run.dir={tmp_path / 'r'}", *tiny_data]
    assert_user_error(run_cli(*base, "--set", "parallel.strategy=fsdp"), "torchrun")
    assert_user_error(run_cli(*base, "--set", "train.global_batch_size=6"), "not divisible")
    assert not (tmp_path / "r" / "checkpoints").exists()
