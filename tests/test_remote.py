"""checkpoint.remote against a real S3 protocol server (moto's server mode on a free loopback port, s3fs as
the client): background upload, resume on an empty run dir, kills during upload, retention, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import DEBUG_TINY, assert_user_error
from .test_trainer import losses


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server in this process; the environment a trainer subprocess needs to reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.stop()


def s3(env: dict):
    """An s3fs client of the moto server (a fresh instance: fsspec caches them per options)."""
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"b-{uuid.uuid4().hex[:10]}"
    s3(s3_env).mkdir(name)
    return name


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


def test_unusable_remotes_exit_2_before_training(tmp_path, tiny_data, s3_env, bucket):
    """Bad URLs at config resolve; missing bucket, unreachable endpoint, no credentials at trainer start,
    before data prep: exit 2, one message, nothing written in the run dir."""
    no_creds = {k: v for k, v in s3_env.items() if not k.startswith("AWS_ACCESS_KEY_ID")
                and not k.startswith("AWS_SECRET")}
    no_creds.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    cases = [
        ("s3//no-scheme", s3_env, "must be a URL with a scheme"),
        ("nosuch://x/y", s3_env, "unknown storage scheme"),
        ("s3:///prefix", s3_env, "names no bucket"),
        (f"s3://missing-{bucket}/r", s3_env, "bucket or directory does not exist"),
        (f"s3://{bucket}/r", {**s3_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "endpoint cannot be reached"),
        (f"s3://{bucket}/r", no_creds, "no credentials"),
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for i, (url, env, needle) in enumerate(cases):
        run = tmp_path / f"run{i}"
        args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run}",
                *tiny_data, "--set", f"checkpoint.remote={url}"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**base, **env})
        assert_user_error(proc, needle)
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists(), url
