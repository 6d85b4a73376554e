"""checkpoint.remote against a real S3 protocol server (moto's server mode on a free loopback port, s3fs as
the client): background upload, resume on an empty run dir, kills during upload, retention, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smoltrain.config import load_config
from smoltrain.errors import UserError
from smoltrain.train.trainer import Trainer

from .conftest import DEBUG_TINY, assert_user_error, s3
from .test_trainer import losses, sigterm_a_long_run


def train(run_dir: Path, tiny_data: list[str], *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}",
            *tiny_data, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_data) -> list[tuple]:
    """The loss curve of an uninterrupted 30-step run without a remote."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = train(run, tiny_data)
    assert proc.returncode == 0, proc.stderr
    return losses(run)


def remote_steps(env: dict, prefix: str) -> tuple[list[int], list[int]]:
    """(steps with a manifest, every step dir) under s3://PREFIX/checkpoints."""
    fs = s3(env)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/checkpoints")]
    every = sorted(int(n[5:]) for n in names if n.startswith("step_"))
    valid = [s for s in every if fs.exists(f"{prefix}/checkpoints/step_{s:08d}/manifest.json")]
    return valid, every


@pytest.mark.slow
def test_preempted_run_resumes_from_s3_on_an_empty_run_dir(tmp_path, tiny_data, s3_env, bucket, straight):
    """Step 20 uploaded, then the machine dies (SIGKILL) and its disk is gone: the same command on an empty
    run dir downloads step 20, restores the logs, and ends with losses equal to a straight run."""
    run, url = tmp_path / "run", f"s3://{bucket}/runs/tiny"
    sets = ["--set", f"checkpoint.remote={url}", "--set", "checkpoint.keep_last=2"]
    killed = train(run, tiny_data, *sets, env={**s3_env, "SMOLTRAIN_FAULT": "after_upload=20"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert remote_steps(s3_env, f"{bucket}/runs/tiny") == ([10, 20], [10, 20])
    shutil.rmtree(run)  # the spot VM comes back empty
    resumed = train(run, tiny_data, *sets, env=s3_env)
    assert resumed.returncode == 0, resumed.stderr
    line = next(ln for ln in resumed.stdout.splitlines() if ln.startswith("Resuming from"))
    assert "step_00000020 (step 20), downloaded from " + f"{url}/checkpoints/step_00000020" in line
    assert losses(run) == straight  # steps 1-20 restored from the remote logs, 21-30 trained again: exactly equal
    assert remote_steps(s3_env, f"{bucket}/runs/tiny") == ([20, 30], [20, 30])  # retention applies remotely
    remote_metrics = s3(s3_env).cat_file(f"{bucket}/runs/tiny/metrics.jsonl").decode()
    assert remote_metrics == (run / "metrics.jsonl").read_text()  # the final upload finished before exit
    for name in ("config.yaml", "env.json", "samples.jsonl"):
        assert s3(s3_env).exists(f"{bucket}/runs/tiny/{name}")


@pytest.mark.slow
def test_kill_during_upload_keeps_the_previous_remote_checkpoint(tmp_path, tiny_data, s3_env, bucket, straight):
    """kill -9 with step 20 half uploaded: it has no manifest, so step 10 stays the newest valid remote copy,
    and an empty run dir resumes from it."""
    run, url = tmp_path / "run", f"s3://{bucket}/r"
    sets = ["--set", f"checkpoint.remote={url}"]
    killed = train(run, tiny_data, *sets, env={**s3_env, "SMOLTRAIN_FAULT": "in_upload=20"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "checkpoints" / "step_00000020").is_dir()  # committed locally, half uploaded
    assert remote_steps(s3_env, f"{bucket}/r") == ([10], [10, 20])
    shutil.rmtree(run)
    resumed = train(run, tiny_data, *sets, env=s3_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000010 (step 10), downloaded from " in resumed.stdout
    assert losses(run) == straight
    assert remote_steps(s3_env, f"{bucket}/r")[0] == [10, 20, 30]  # step 20 uploaded again, whole this time


def test_bad_remote_urls_are_refused_at_config_resolve():
    for url, needle in [("s3//no-scheme", "must be a URL with a scheme"), ("nosuch://x/y", "unknown storage scheme"),
                        ("s3:///prefix", "names no bucket")]:
        with pytest.raises(UserError, match=needle):
            load_config(DEBUG_TINY, [f"checkpoint.remote={url}"])


def test_unusable_stores_are_refused_before_data_prep(tmp_path, tiny_data, s3_env, bucket, monkeypatch):
    """Missing bucket, unreachable endpoint, no credentials: refused when the trainer starts, before the
    tokenizer or data are touched and before the run dir exists."""
    import s3fs

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    sets = [v for v in tiny_data if v != "--set"]
    data_dir = tmp_path / "data"
    cases = [(f"s3://missing-{bucket}/r", {}, "bucket or directory does not exist"),
             (f"s3://{bucket}/r", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "endpoint cannot be reached"),
             (f"s3://{bucket}/r", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no credentials")]
    for url, env, needle in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v) if v else monkeypatch.delenv(k)
        s3fs.S3FileSystem.clear_instance_cache()
        cfg = load_config(DEBUG_TINY, [*sets, f"run.dir={tmp_path / 'run'}", f"run.data_dir={data_dir}",
                                       f"checkpoint.remote={url}"])
        with pytest.raises(UserError, match=needle):
            Trainer(cfg)
        assert not data_dir.exists() and not (tmp_path / "run" / "checkpoints").exists()
        for k in env:
            monkeypatch.setenv(k, s3_env[k])


def test_cli_refusal_is_exit_2_without_traceback(tmp_path, tiny_data, s3_env, bucket):
    proc = train(tmp_path / "run", tiny_data, "--set", f"checkpoint.remote=s3://missing-{bucket}/r", env=s3_env)
    assert_user_error(proc, "is not usable", "bucket or directory does not exist")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def _fake_run(tmp_path: Path, tiny_ckpt: Path, steps: list[int]) -> Path:
    """A run dir whose checkpoints are copies of the tiny checkpoint (manifest included), plus a log."""
    run = tmp_path / "local"
    for step in steps:
        shutil.copytree(tiny_ckpt, run / "checkpoints" / f"step_{step:08d}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": steps[-1], "loss": 1.0}) + "\n")
    return run


def test_local_directory_remote_commit_retention_and_verified_restore(tmp_path, tiny_ckpt, capsys):
    """file:// as the remote: manifest-last validity, retention of valid copies, a corrupt newest copy skipped."""
    from smoltrain.checkpoint.remote import Remote

    run, store = _fake_run(tmp_path, tiny_ckpt, [10, 20, 30]), tmp_path / "store"
    remote = Remote(f"file://{store}")
    remote.check()
    for step in (10, 20):
        remote.upload_checkpoint(run / "checkpoints" / f"step_{step:08d}", step, run, keep_last=2)
    (store / "checkpoints" / "step_00000030").mkdir()  # a half upload: files, no manifest
    shutil.copy(tiny_ckpt / "config.json", store / "checkpoints" / "step_00000030")
    assert remote.steps() == [10, 20] and remote.steps(valid_only=False) == [10, 20, 30]
    remote.upload_checkpoint(run / "checkpoints" / "step_00000030", 30, run, keep_last=2)
    assert remote.steps() == [20, 30] and remote.steps(valid_only=False) == [20, 30]
    assert (store / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()

    weights = store / "checkpoints" / "step_00000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"oops")  # corrupt the newest remote copy
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    local, step = remote.restore(fresh)
    assert step == 20 and local == fresh / "checkpoints" / "step_00000020"
    assert "skipping" in capsys.readouterr().err and not (fresh / "checkpoints" / "step_00000030").exists()
    assert sorted(p.name for p in (fresh / "checkpoints").iterdir()) == ["step_00000020"]  # no staging left
    assert (fresh / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()  # logs restored too


@pytest.mark.slow
def test_sigterm_finishes_the_upload_before_exit(tmp_path, tiny_data, s3_env, bucket):
    """A preempted VM's SIGTERM: the signal's checkpoint is saved, uploaded whole, then the process exits."""
    run, url = tmp_path / "run", f"s3://{bucket}/sig"
    proc, out, err = sigterm_a_long_run(run, tiny_data, f"checkpoint.remote={url}", env=s3_env)
    assert proc.returncode == 128 + signal.SIGTERM, err
    (local,) = [p.name for p in (run / "checkpoints").iterdir()]
    assert remote_steps(s3_env, f"{bucket}/sig") == ([int(local[5:])], [int(local[5:])])
    assert "SIGTERM: saved" in out
