"""The fault-injection hook: read once from the environment, or installed by a test, fired at its named point."""

from __future__ import annotations

import errno

import pytest

from smoltrain import faults
from smoltrain.faults import Faults, fault_point


@pytest.fixture(autouse=True)
def _uninstall():
    yield
    faults.install(None)


def test_spec_parses_points_and_actions_in_order():
    assert Faults.parse("after_step=12, in_save=5:term,in_save=5:int").specs == (
        ("after_step=12", "kill"), ("in_save=5", "term"), ("in_save=5", "int"))
    assert Faults.parse(None).specs == Faults.parse("").specs == ()


def test_rank_filter_reads_rank_and_fault_rank_once():
    env = {"SMOLTRAIN_FAULT": "in_save=3", "SMOLTRAIN_FAULT_RANK": "1"}
    assert Faults.from_env({**env, "RANK": "0"}).specs == ()
    assert Faults.from_env({**env, "RANK": "1"}).specs == (("in_save=3", "kill"),)
    assert Faults.from_env({"SMOLTRAIN_FAULT": "in_save=3"}).specs == (("in_save=3", "kill"),)  # one process: rank 0


def test_installed_faults_fire_only_at_their_point():
    faults.install(Faults.parse("in_log=7:enospc"))
    fault_point("in_log", 6)
    fault_point("in_save", 7)
    with pytest.raises(OSError) as e:
        fault_point("in_log", 7)
    assert e.value.errno == errno.ENOSPC


def test_the_environment_is_read_once(monkeypatch):
    monkeypatch.setenv("SMOLTRAIN_FAULT", "in_log=2:enospc")
    monkeypatch.delenv("SMOLTRAIN_FAULT_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    faults.install(None)
    fault_point("in_log", 1)  # reads the environment now
    monkeypatch.delenv("SMOLTRAIN_FAULT")
    with pytest.raises(OSError):
        fault_point("in_log", 2)
