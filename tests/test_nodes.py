"""Several nodes without a shared filesystem: two torchrun "nodes" on loopback (torchrun --nnodes 2, one
process each, `--node_rank 0` and `1`), each with a run dir and data dir of its own, meeting only on
checkpoint.remote (moto's S3 server, or a local directory). Each rank writes its own part of the optimizer
state; the ranks on the other node upload theirs to the store; every node fetches the chosen checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEBUG_TINY, s3
from .test_trainer import losses

STEPS = ["--set", "train.max_steps=30", "--set", "checkpoint.every=10", "--set", "eval.every=10",
         "--set", "eval.prompts=[]", "--set", "train.micro_batch_size=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PARTS = ["optimizer/shard-00001-model-00001-of-00001.safetensors",
         "optimizer/shard-00002-model-00001-of-00001.safetensors"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_args(run_dir: Path, tiny_data: list[str], *extra: str) -> list[str]:
    """One node's command line: its own run dir and data dir (nothing is shared with the other node)."""
    return ["-m", "smoltrain", "train", "--config", str(DEBUG_TINY), *tiny_data, "--set", f"run.dir={run_dir}",
            "--set", f"run.data_dir={run_dir}/data", *STEPS, *extra]


def two_nodes(dirs: list[Path], tiny_data: list[str], *extra: str, env: dict | None = None,
              per_node: list[list[str]] | None = None) -> list[subprocess.CompletedProcess]:
    """Launch node 0 (rank 0) with dirs[0] and node 1 with dirs[1]; wait for both."""
    port = free_port()
    procs = []
    for rank, run_dir in enumerate(dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               *node_args(run_dir, tiny_data, *extra, *(per_node[rank] if per_node else []))]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**ENV, **(env or {})}))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_data) -> list[tuple]:
    """The curve of an uninterrupted two-process run in one (shared) run dir, same global batch."""
    run = tmp_path_factory.mktemp("shared") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *node_args(run, tiny_data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run)


def steps_on(fs, prefix: str) -> list[int]:
    """Steps whose checkpoint on the store is complete (its manifest, uploaded last, is there)."""
    fs.invalidate_cache()  # s3fs caches listings
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/checkpoints")]
    return sorted(int(n[5:]) for n in names if fs.exists(f"{prefix}/checkpoints/{n}/manifest.json"))


@pytest.mark.slow
def test_two_nodes_without_a_shared_filesystem_resume_from_s3_exactly(tmp_path, tiny_data, s3_env, bucket, shared):
    """Rank 0 is killed right after step 20 is on S3 and both machines come back empty: the same commands
    fetch step 20 on each node, and the run ends equal to a run in one shared run dir, step for step."""
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    url = f"s3://{bucket}/run"
    remote = ["--set", f"checkpoint.remote={url}"]
    fault = {**s3_env, "SMOLTRAIN_FAULT": "after_upload=20", "SMOLTRAIN_FAULT_RANK": "0"}
    killed = two_nodes(dirs, tiny_data, *remote, env=fault)
    assert killed[0].returncode != 0
    fs = s3(s3_env)
    assert steps_on(fs, f"{bucket}/run") == [10, 20]
    manifest = json.loads(fs.cat_file(f"{bucket}/run/checkpoints/step_00000020/manifest.json"))
    assert all(p in manifest["files"] for p in PARTS), sorted(manifest["files"])  # one part per rank
    assert not list((dirs[1] / "checkpoints").glob("step_*"))  # node 1 committed nothing of its own
    assert sorted((dirs[0] / "checkpoints" / "step_00000020" / "optimizer").iterdir()) == sorted(
        dirs[0] / "checkpoints" / "step_00000020" / p for p in [*PARTS, "optimizer/optimizer.json"])
    for d in dirs:
        shutil.rmtree(d)  # both spot VMs come back with empty disks
    resumed = two_nodes(dirs, tiny_data, *remote, env=s3_env)
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    assert f"downloading {url}/checkpoints/step_00000020" in resumed[0].stdout
    assert f"downloading {url}/checkpoints/step_00000020" in resumed[1].stdout
    assert "(step 20), downloaded from" in resumed[0].stdout
    assert losses(dirs[0]) == shared  # steps 1-20 from the store's logs, 21-30 trained again: exactly equal

    # node 1 now leads (it only ever fetched step 20): the store's newer step 30 is the one resumed
    extended = two_nodes(dirs[::-1], tiny_data, *remote, "--set", "train.max_steps=34", env=s3_env)
    assert [p.returncode for p in extended] == [0, 0], extended[0].stderr[-3000:]
    assert "newer than step 20: downloading" in extended[0].stdout
    assert "(step 30)" in extended[0].stdout
    assert [s for s, loss, _ in losses(dirs[1]) if loss is not None] == list(range(1, 35))
    assert steps_on(fs, f"{bucket}/run") == [20, 30, 34]  # keep_last 3 on the store


@pytest.mark.slow
def test_fsdp_parts_from_two_nodes_resume_in_one_process(tmp_path, tiny_data, shared):
    """FSDP across two nodes with a local directory as the store; one process on a fresh machine resumes
    the two-part optimizer state (resharded by torch's distributed checkpoint) and follows the curve."""
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    remote = ["--set", f"checkpoint.remote=file://{tmp_path}/store", "--set", "parallel.strategy=fsdp"]
    killed = two_nodes(dirs, tiny_data, *remote, env={"SMOLTRAIN_FAULT": "after_upload=20",
                                                      "SMOLTRAIN_FAULT_RANK": "0"})
    assert killed[0].returncode != 0
    one = tmp_path / "one"
    args = node_args(one, tiny_data, "--set", f"checkpoint.remote=file://{tmp_path}/store",
                     "--set", "train.micro_batch_size=4")  # the same global batch in one process
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 20), downloaded from" in proc.stdout
    got = {s: loss for s, loss, _ in losses(one) if loss is not None}
    ref = {s: loss for s, loss, _ in shared if loss is not None}
    assert all(abs(got[s] - ref[s]) < 1e-4 for s in range(21, 31)), (got, ref)


@pytest.mark.slow
def test_separate_run_dirs_are_refused_without_a_remote_and_with_different_data(tmp_path, tiny_data):
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    refused = two_nodes(dirs, tiny_data)
    text = refused[0].stdout + refused[0].stderr
    assert refused[0].returncode != 0
    assert "is not shared between the nodes: rank 1" in text and "set checkpoint.remote" in text, text[-3000:]
    assert not (dirs[0] / "data").exists()  # refused before any data was prepared

    other = tmp_path / "other-corpus"
    source = Path(next(a for a in tiny_data if a.startswith("data.datasets=")).split("['")[1].split("']")[0])
    shutil.copytree(source, other)
    (other / "extra.txt").write_text("one more document on node 1 only. " * 50)
    differ = two_nodes(dirs, tiny_data, "--set", f"checkpoint.remote=file://{tmp_path}/store",
                       per_node=[[], ["--set", f"data.datasets=[{{name: tiny, sources: ['{other}']}}]"]])
    text = differ[0].stdout + differ[0].stderr
    assert differ[0].returncode != 0
    assert "The nodes prepared different data: rank 1's" in text, text[-3000:]
    assert not list((dirs[0] / "checkpoints").glob("step_*"))
