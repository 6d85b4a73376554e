"""`smoltrain plan` and the data budget: tokens, passes, memory, refusals (#23 items 1-2, #28 item 3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import DEBUG_TINY, assert_user_error, run_cli

ROOT = Path(__file__).parent.parent


def _prepared(tiny_data: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in tiny_data if a.startswith("run.data_dir="))) / "tiny"


def _train(run: Path, tiny_data: list[str], *extra: str):
    return run_cli("train", "--config", DEBUG_TINY, "--set", f"run.dir={run}", *tiny_data, "--set", "eval.every=0",
                   "--set", "eval.prompts=[]", *extra)


def test_plan_counts_prepared_tokens_exactly(tmp_path, tiny_data):
    """On a prepared corpus the plan's tokens are meta.json's, and passes are planned / available."""
    assert _train(tmp_path / "r", tiny_data, "--set", "train.max_steps=1").returncode == 0  # prepares the data
    meta = json.loads((_prepared(tiny_data) / "meta.json").read_text())
    have = meta["splits"]["train"]["num_tokens"]
    proc = run_cli("plan", "--config", DEBUG_TINY, *tiny_data, "--set", "train.max_steps=50")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("tiny:"))
    assert f"from {have:,} training tokens (exact, from" in line
    planned = 50 * 4 * 64
    assert f"{planned:,} tokens planned" in line and f"{planned / have:.2f} passes" in line
    for needle in ("parameters", "FLOPs per token", "peak", "H100", "GPU-hours", "Checkpoint:"):
        assert needle in proc.stdout


def test_plan_refuses_unknown_gpus_and_shapes_that_fit_nowhere():
    assert_user_error(run_cli("plan", "--config", DEBUG_TINY, "--gpu", "TPUv9"), "Unknown GPU", "H100")
    # the plain loss (loss_chunk 0): the fused loss would trace one chunk at a time, thousands of them here
    huge = ["--set", "train.micro_batch_size=200000", "--set", "train.seq_len=256", "--set", "train.loss_chunk=0"]
    assert_user_error(run_cli("plan", "--config", DEBUG_TINY, *huge), "fits no GPU", "micro_batch_size")


def test_a_run_that_would_repeat_its_data_is_refused_before_its_first_step(tmp_path, tiny_data):
    """max_epochs 1 on a corpus of a few thousand tokens: exit 2 with the numbers and the ways out, no
    checkpoint; allowed, the loader says when it starts the second pass."""
    ok = _train(tmp_path / "first", tiny_data, "--set", "train.max_steps=1")  # the data is prepared now
    assert ok.returncode == 0, ok.stderr
    have = json.loads((_prepared(tiny_data) / "meta.json").read_text())["splits"]["train"]["num_tokens"]
    batch = ["--set", "train.micro_batch_size=32"]  # few steps to a second pass: 2048 tokens a step
    steps = have // (32 * 64) + 2
    run = tmp_path / "again"
    proc = _train(run, tiny_data, *batch, "--set", f"train.max_steps={steps}", "--set", "data.max_epochs=1")
    assert_user_error(proc, "data.max_epochs", "passes", "lower train.max_steps")
    assert not run.exists()  # refused before the run dir got anything
    proc = _train(run, tiny_data, *batch, "--set", f"train.max_steps={steps}", "--set", "data.max_epochs=2",
                  "--set", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr
    assert "Tokens planned vs available" in proc.stdout
    assert len(re.findall(r"Data: starting pass 2 over tiny", proc.stdout)) == 1


def test_prepare_stops_at_max_tokens(tmp_path, tiny_tokenizer_dir):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(30):  # 2.1 MB of text: two work items of about a megabyte
        (corpus / f"d{i:02d}.txt").write_text(f"word{i} " * 10000)
    full = run_cli("prepare", "--source", corpus, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "all",
                   "--num-proc", "1")
    capped = run_cli("prepare", "--source", corpus, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "cap",
                     "--num-proc", "1", "--max-tokens", "50000")
    assert full.returncode == 0 and capped.returncode == 0, capped.stderr
    total = json.loads((tmp_path / "all" / "meta.json").read_text())["num_tokens"]
    meta = json.loads((tmp_path / "cap" / "meta.json").read_text())
    assert 50_000 <= meta["num_tokens"] < total and meta["recipe"]["max_tokens"] == 50_000


def test_gpu_recipe_on_cpu_warns_and_falls_back_or_is_refused(tmp_path, tiny_data):
    run = tmp_path / "gpu-recipe"
    proc = _train(run, tiny_data, "--set", "train.max_steps=2", "--set", "train.dtype=bf16",
                  "--set", "train.compile=true")
    assert proc.returncode == 0, proc.stderr
    assert "bf16 -> fp32" in proc.stdout and "torch.compile off" in proc.stdout
    huge = tmp_path / "huge"
    proc = _train(huge, tiny_data, "--set", "train.dtype=bf16", "--set", "train.micro_batch_size=400000",
                  "--set", "train.seq_len=256", "--set", "train.loss_chunk=0")
    assert_user_error(proc, "GiB on this CPU", "available")
    assert not huge.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "quickstart", "debug-tiny"])
def test_plan_runs_offline_on_every_shipped_config(name):
    """Every shipped recipe plans offline; the 1.7B one (planned, never run, #23) is planned the way its
    README section does, on 8 H100s, and prints its memory per GPU for 1, 4 and 8 GPUs."""
    gpus = ["--gpus", "8", "--gpu", "H100"] if name == "smollm2-1.7b" else []
    proc = run_cli("plan", "--config", ROOT / "configs" / f"{name}.yaml", *gpus, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "peak" in proc.stdout and "passes" in proc.stdout
    if gpus:
        line = next(x for x in proc.stdout.splitlines() if "peak per GPU by GPU count (fsdp" in x)
        assert all(f"{n} GPU" in line for n in (1, 4, 8))


def test_plan_estimates_an_unprepared_local_source_from_the_files_prepare_reads(tmp_path, tiny_tokenizer_dir):
    """Text size over bytes per token, counting what prepare would read: .txt (plus --data-ext's), never a
    catalogue file; the estimate grows with the files it is allowed to read."""
    from tests.conftest import SAMPLE_TEXT

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(SAMPLE_TEXT * 100)  # 0.64 MB
    (corpus / "sub" / "b.txt").write_text(SAMPLE_TEXT * 200)
    (corpus / "notes.md").write_text(SAMPLE_TEXT * 400)
    (corpus / "metadata.txt").write_text("[a]\ntitle = A\nauthor = B\n\n[b]\ntitle = C\nauthor = D\n")
    sets = ["--set", f"run.data_dir={tmp_path / 'data'}", "--set", f"data.tokenizer={tiny_tokenizer_dir}",
            "--set", "data.train_tokenizer_vocab_size=0", "--set", f"data.datasets=[{{name: c, sources: ['{corpus}']}}]"]
    megabytes = {}
    for ext in ([], ["--set", "data.text_extensions=[.txt, .md]"]):
        proc = run_cli("plan", "--config", DEBUG_TINY, *sets, *ext)
        assert proc.returncode == 0, proc.stderr
        line = next(x for x in proc.stdout.splitlines() if "estimated:" in x)
        assert "bytes per token measured" in line, line
        megabytes[bool(ext)] = float(re.search(r"estimated: ([\d.]+) MB of text", line).group(1))
    assert megabytes[False] == round(300 * len(SAMPLE_TEXT.encode()) / 1e6, 1)
    assert megabytes[True] == round(700 * len(SAMPLE_TEXT.encode()) / 1e6, 1)
