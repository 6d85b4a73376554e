"""`smoltrain prepare` as a user runs it: success, re-run, and every user mistake exits 2 with one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from smoltrain.data.shards import load_meta

from .conftest import assert_user_error, make_corpus_text, run_cli


def test_prepare_cli_then_rerun_is_a_noop(tmp_path, bpe_dir):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in make_corpus_text(20)))
    args = ["prepare", "--source", tmp_path / "d.jsonl", "--tokenizer", bpe_dir, "--out", tmp_path / "out",
            "--val-docs", "2", "--num-proc", "1"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Prepared" in proc.stdout and "Traceback" not in proc.stderr
    meta = load_meta(tmp_path / "out")
    assert meta["num_documents"] == 20 and meta["splits"]["val"]["num_documents"] == 2
    again = run_cli(*args)
    assert again.returncode == 0 and "already prepared" in again.stdout
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0 and "Prepared" in forced.stdout


def test_prepare_user_errors_exit_2(tmp_path, bpe_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "ok.txt").write_text("hello world")
    common = ["--tokenizer", bpe_dir, "--out", tmp_path / "out"]
    cases = [
        (["--source", tmp_path / "empty"], "holds no readable documents"),
        (["--source", tmp_path / "missing"], "does not exist"),
        (["--source", tmp_path / "data.csv"], "unsupported type"),
        (["--source", tmp_path / "ok.txt", "--model-vocab-size", "100"], "vocab_size is 100"),
        (["--source", tmp_path / "ok.txt", "--tokenizer", tmp_path / "notok"], "does not exist"),
    ]
    for extra, needle in cases:
        proc = run_cli("prepare", *common, *extra)
        assert_user_error(proc, needle)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one clear message
    assert not (tmp_path / "out").exists()


def test_unknown_hf_dataset_without_network_exits_2(tmp_path, bpe_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "smoltrain", "prepare", "--source", "hf:nobody/no-such-dataset",
                           "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc, "Could not open the Hugging Face dataset nobody/no-such-dataset")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
