"""Checkpoint commit protocol: complete-or-absent, manifest checks, quarantine, retention."""

from __future__ import annotations

import pytest

from smoltrain import checkpoint as ck
from smoltrain.errors import UserError


def _commit(run, step, payload=b"x"):
    with ck.staged_dir(ck.step_dir(run, step)) as d:
        (d / "a.bin").write_bytes(payload * 100)
    return ck.step_dir(run, step)


def test_failed_save_leaves_nothing_and_previous_intact(tmp_path):
    _commit(tmp_path, 10)
    with pytest.raises(RuntimeError), ck.staged_dir(ck.step_dir(tmp_path, 20)) as d:
        (d / "a.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000010"]
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "checkpoints").iterdir())
    assert ck.find_resume_checkpoint(tmp_path).name == "step_00000010"


def test_corrupt_newest_is_skipped_and_quarantined(tmp_path):
    _commit(tmp_path, 10)
    bad = _commit(tmp_path, 20)
    (bad / "a.bin").write_bytes(b"y" * 100)  # same size, other bytes
    with pytest.warns(UserWarning, match="a.bin"):
        assert ck.find_resume_checkpoint(tmp_path).name == "step_00000010"
    assert not bad.exists()
    assert any(p.name.startswith(".corrupt-step_00000020") for p in (tmp_path / "checkpoints").iterdir())
    _commit(tmp_path, 20)  # the same step can be saved again
    assert ck.find_resume_checkpoint(tmp_path).name == "step_00000020"


def test_all_corrupt_refuses_fresh_start(tmp_path):
    bad = _commit(tmp_path, 10)
    (bad / ck.MANIFEST).unlink()
    with pytest.warns(UserWarning), pytest.raises(UserError, match="refusing to start fresh"):
        ck.find_resume_checkpoint(tmp_path)


def test_staging_debris_is_ignored_and_cleaned(tmp_path):
    _commit(tmp_path, 5)
    debris = tmp_path / "checkpoints" / ".staging-step_00000010-abcd"
    debris.mkdir()
    (tmp_path / "checkpoints" / "step_00000099.tmp").mkdir()  # not a committed name either
    assert ck.find_resume_checkpoint(tmp_path).name == "step_00000005"
    ck.clean_debris(tmp_path)
    assert not debris.exists()


def test_retention_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _commit(tmp_path, s)
    ck.retain(tmp_path, 2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
