"""A CLI that explains itself: --version, defaults in every --help, the resolved config and its keys, one set
of sampling defaults, commands to copy that name smoltrain as it was invoked, a labelled progress bar, a
summary of this segment, readable exports, a demo hint from the run, and peak memory on CPU."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from smoltrain import __version__
from smoltrain.cli import build_parser
from smoltrain.config import EvalConfig, load_config
from smoltrain.model.config import SamplingConfig

from .conftest import DEBUG_TINY, run_cli

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def parsers(parser: argparse.ArgumentParser, name: str = "smoltrain"):
    """Every parser of the CLI with its command line, subcommands included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"smoltrain {__version__}"), proc


def test_every_help_shows_the_defaults():
    missing = []
    for name, parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            if f"(default: {action.default})" not in text and "default" not in (action.help or "").lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    assert "(default: 50)" in " ".join(dict(parsers(build_parser()))["smoltrain generate"].format_help().split())


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = run_cli("train", "--config", QUICKSTART, "--set", "train.max_steps=7", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == load_config(QUICKSTART, ["train.max_steps=7"]).to_dict()
    assert list(tmp_path.iterdir()) == []
    bad = run_cli("train", "--config", QUICKSTART, "--set", "train.max_steps=0", "--print-config", cwd=tmp_path)
    assert bad.returncode == 2 and "train.max_steps must be > 0" in bad.stderr


def test_config_keys_lists_types_domains_and_defaults():
    proc = run_cli("config", "keys")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "int >= 0 (0: use data.tokenizer as is)" in lines["data.train_tokenizer_vocab_size"]
    assert "one of wsd, cosine, linear, constant" in lines["optim.schedule"] and "(default wsd)" in lines["optim.schedule"]
    assert "(default [.txt])" in lines["data.text_extensions"]
    assert "data.datasets[].val_documents" in lines and "model.vocab_size" in lines
    only = run_cli("config", "keys", "eval")
    assert only.returncode == 0 and all(line.startswith("eval.") for line in only.stdout.splitlines())
    assert run_cli("config", "keys", "evl").returncode == 2


def test_one_set_of_sampling_defaults():
    """generate's options, the demo's sliders and the in-training samples start from SamplingConfig's."""
    from smoltrain.app import demo

    shared = SamplingConfig()
    gen = build_parser().parse_args(["generate", "ckpt", "--prompt", "x"])
    assert (gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty) == (
        shared.temperature, shared.top_k, shared.top_p, shared.repetition_penalty)
    ev = EvalConfig()
    assert (ev.temperature, ev.top_k, ev.top_p) == (shared.temperature, shared.top_k, shared.top_p)
    assert demo.SAMPLING == shared
    quick = load_config(QUICKSTART).eval  # the quickstart keeps the values it was measured with
    assert (quick.temperature, quick.top_k, quick.top_p) == (0.8, 40, 1.0)


@pytest.mark.parametrize("orig_argv, argv0, me, board", [
    ([".venv/bin/python", ".venv/bin/smoltrain", "train"], ".venv/bin/smoltrain", ".venv/bin/smoltrain",
     ".venv/bin/tensorboard"),
    (["python3", "-m", "smoltrain", "train"], "/x/smoltrain/__main__.py", "python3 -m smoltrain",
     "python3 -m tensorboard.main"),
    (["/usr/bin/python3", "/usr/bin/smoltrain"], "smoltrain", "smoltrain", "tensorboard"),
])
def test_next_lines_name_smoltrain_as_invoked(tmp_path, monkeypatch, orig_argv, argv0, me, board):
    from smoltrain.train.steplog import summary

    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0, "train"])
    text = summary(tmp_path, 5, 1000, 10.0, True, "ROMEO:", None, start_step=3)
    assert "Done: steps 3-5, 1,000 tokens in 0.2 min (100 tokens/s" in text
    assert f"  {me} generate {tmp_path} --prompt \"ROMEO:\"" in text and f"  {me} demo {tmp_path}" in text
    assert f"  tensorboard  {board} --logdir {tmp_path / 'tb'}" in text


def train(run: Path, tiny_data: list[str], *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run}",
            *tiny_data, "--set", "eval.every=0", "--set", "checkpoint.every=0", "--set", "log.progress=true",
            *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_a_run_labels_its_end_sums_up_its_segment_and_logs_memory(tmp_path, tiny_data):
    import json

    from smoltrain.app.demo import CheckpointSource

    run = tmp_path / "run"
    first = train(run, tiny_data, "train.max_steps=2")
    assert first.returncode == 0, first.stderr
    for label in ("final eval", "final samples", "final save"):  # the bar says what the end waits for
        assert label in first.stderr, first.stderr
    assert "Done: step 2, 512 tokens" in first.stdout  # micro 4 x 64 tokens x 2 steps
    extended = train(run, tiny_data, "train.max_steps=5")
    assert extended.returncode == 0, extended.stderr
    assert "Done: steps 2-5, 768 tokens" in extended.stdout  # this segment's 3 steps, not the run's 5
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mem_gb"] > 0.05 for r in steps if "loss" in r)  # peak RSS, not null, on CPU
    assert CheckpointSource(run).placeholder() == "ROMEO:"  # the demo's hint: the run's own prompt


def test_exported_files_are_world_readable(tiny_ckpt, tmp_path):
    from smoltrain.app.demo import CheckpointSource

    out = tmp_path / "hf"
    proc = run_cli("export", tiny_ckpt, "--out", out)
    assert proc.returncode == 0, proc.stderr
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~mask, modes
    assert set(modes.values()) == {0o666 & ~mask}, modes
    assert CheckpointSource(tiny_ckpt).placeholder() == "Once upon a time"  # no run config: a generic hint


def test_a_catalogue_warning_prints_once(tmp_path, caplog):
    from smoltrain.data.sources import resolve_sources

    (tmp_path / "metadata.txt").write_text("[hamlet]\nurl = a\n[macbeth]\nurl = b\n")
    (tmp_path / "play.txt").write_text("Enter HAMLET.\nTo be, or not to be.\n")
    with caplog.at_level(logging.WARNING, logger="smoltrain.data"):
        resolve_sources([tmp_path])
        resolve_sources([tmp_path])  # the tokenizer and prepare both list the folder
    assert sum("catalogue" in r.getMessage() for r in caplog.records) == 1
