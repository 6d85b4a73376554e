"""wandb (a real install, WANDB_MODE=offline): the same scalars as metrics.jsonl, a samples table per
sampling round, and one wandb run across resumes (its id kept in RUN/wandb.json)."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest

from .test_remote import train
from .test_trainer import losses


def wandb_records(path: Path):
    """The protobuf records of an offline run file (wandb's LevelDB-style log: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec


def offline_runs(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of each offline segment, oldest first."""
    out = []
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        out.append((run_id, rows))
    return out


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # no trainer may attach to another process's service
    yield env
    import wandb

    wandb.teardown()  # this process's wandb-core service, if a test started one
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def test_runlog_continues_one_wandb_run(tmp_path, wandb_offline):
    from smoltrain.train.runlog import RunLog

    run = tmp_path / "run"
    for first in (1, 3):  # two segments: a run and its resume from step 2
        log = RunLog(run, first - 1, False, "smoltrain-test", {"train": {"seed": 1}})
        for step in (first, first + 1):
            log.log({"step": step, "loss": 1.0 / step, "mfu": None, "tokens_per_source": {"a": 1}})
        log.sample({"step": first + 1, "mode": "greedy", "prompt": "ROMEO:", "text": " hi"})
        log.samples_done(first + 1)
        log.close()
    import wandb

    wandb.teardown()  # the service writes the run files after finish() returns: let it end first
    run_id = json.loads((run / "wandb.json").read_text())["id"]
    segments = offline_runs(run)
    assert [s[0] for s in segments] == [run_id, run_id]  # resume="allow" with a kept id: the same run
    rows = [r for _, seg in segments for r in seg]
    assert [(r["_step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [r["_step"] for r in rows if r.get("samples/_type") == "table-file"] == [2, 4]


@pytest.mark.slow
def test_killed_and_resumed_training_logs_one_wandb_run(tmp_path, tiny_data, wandb_offline):
    run = tmp_path / "run"
    sets = ["--set", "log.wandb_project=smoltrain-test"]
    killed = train(run, tiny_data, *sets, env={**wandb_offline, "SMOLTRAIN_FAULT": "after_step=14"})
    assert killed.returncode == -signal.SIGKILL
    run_id = json.loads((run / "wandb.json").read_text())["id"]  # the id the killed segment opened
    resumed = train(run, tiny_data, *sets, env=wandb_offline)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "wandb.json").read_text())["id"] == run_id
    segments = offline_runs(run)
    assert len(segments) == 2
    # the resumed segment continues the killed one's run; the killed segment's own file may end before its
    # run record was flushed (SIGKILL), so its id is checked only where it was written
    assert segments[1][0] == run_id and segments[0][0] in (run_id, None)
    rows = segments[1][1]  # the resumed segment: steps 11-30 as metrics.jsonl has them
    logged = {(r["_step"], r["loss"]) for r in rows if "loss" in r}
    expected = {(step, loss) for step, loss, _ in losses(run) if loss is not None and step > 10}
    assert logged == expected
    assert {r["_step"] for r in rows if "val_loss" in r} == {20, 30}
    assert [r["_step"] for r in rows if r.get("samples/_type") == "table-file"] == [30]


def test_runlog_continues_one_trackio_run(tmp_path, monkeypatch):
    """trackio, the local-first alternative: same scalars, a samples table, one run across resumes."""
    import uuid

    pytest.importorskip("trackio")
    import trackio.sqlite_storage
    from trackio.sqlite_storage import SQLiteStorage

    from smoltrain.train.runlog import RunLog

    # trackio reads TRACKIO_DIR once, at import: point its storage module at a temp dir directly
    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
    project = f"smoltrain-test-{uuid.uuid4().hex[:6]}"
    run = tmp_path / "run"
    for first in (1, 3):
        log = RunLog(run, first - 1, False, None, {"train": {"seed": 1}}, trackio_project=project)
        for step in (first, first + 1):
            log.log({"step": step, "loss": 1.0 / step, "mfu": None})
        log.sample({"step": first + 1, "mode": "greedy", "prompt": "ROMEO:", "text": " hi"})
        log.samples_done(first + 1)
        log.close()
    name = json.loads((run / "trackio.json").read_text())["id"]
    assert SQLiteStorage.get_runs(project) == [name]
    assert (tmp_path / "trackio").is_dir()
    rows = SQLiteStorage.get_logs(project, name)
    assert [(r["step"], r["loss"]) for r in rows if r.get("loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [r["step"] for r in rows if r.get("samples")] == [2, 4]
