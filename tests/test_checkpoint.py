"""Checkpoint commit protocol: complete-or-absent, manifest checks, quarantine, retention."""

from __future__ import annotations

import os

import pytest

from smoltrain import storage
from smoltrain.checkpoint import state as ck
from smoltrain.checkpoint.discovery import list_checkpoints, step_dir
from smoltrain.checkpoint.resume import newest_resumable
from smoltrain.errors import UserError


def _commit(run, step, payload=b"x"):
    with storage.publish(step_dir(run, step), "train") as d:
        (d / "a.bin").write_bytes(payload * 100)
    return step_dir(run, step)


def test_failed_save_leaves_nothing_and_previous_intact(tmp_path):
    _commit(tmp_path, 10)
    with pytest.raises(RuntimeError), storage.publish(step_dir(tmp_path, 20), "train") as d:
        (d / "a.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010"]
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "checkpoints").iterdir())
    assert newest_resumable(tmp_path, False).name == "step_00000010"


def test_corrupt_newest_is_skipped_and_quarantined(tmp_path):
    _commit(tmp_path, 10)
    bad = _commit(tmp_path, 20)
    (bad / "a.bin").write_bytes(b"y" * 100)  # same size, other bytes
    with pytest.warns(UserWarning, match="a.bin"):
        assert newest_resumable(tmp_path, False).name == "step_00000010"
    assert not bad.exists()
    assert any(p.name.startswith(".corrupt-step_00000020") for p in (tmp_path / "checkpoints").iterdir())
    _commit(tmp_path, 20)  # the same step can be saved again
    assert newest_resumable(tmp_path, False).name == "step_00000020"


def test_all_corrupt_refuses_fresh_start(tmp_path):
    bad = _commit(tmp_path, 10)
    (bad / storage.MANIFEST).unlink()
    with pytest.warns(UserWarning), pytest.raises(UserError, match="refusing to start fresh"):
        newest_resumable(tmp_path, False)


def test_staging_debris_is_ignored_and_only_dead_processes_debris_is_cleaned(tmp_path):
    import os
    import subprocess
    import sys

    _commit(tmp_path, 5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = tmp_path / "checkpoints"
    debris = root / f".staging-step_00000010-{int(dead.stdout)}-0123abcd"
    live = root / f".staging-step_00000010-{os.getppid()}-0123abcd"  # a live process's: never touched
    foreign = root / ".staging-step_00000010-abcd"  # not our naming pattern: never touched
    for d in (debris, live, foreign):
        d.mkdir()
    (root / "step_00000099.tmp").mkdir()  # not a committed name either
    assert newest_resumable(tmp_path, False).name == "step_00000005"
    assert ck.clean_debris(tmp_path) == [debris]
    assert not debris.exists() and live.exists() and foreign.exists()


def test_staging_names_are_private_to_the_process(tmp_path):
    a = ck.begin_train_checkpoint(tmp_path, 10)
    b = ck.begin_train_checkpoint(tmp_path, 10)
    assert a != b and a.parent == b.parent == tmp_path / "checkpoints"
    assert str(os.getpid()) in a.name


def test_retention_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _commit(tmp_path, s)
    ck.retain(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
