"""`smoltrain report` on a real 12-step run, the exported model card, and clean refusals of bad inputs."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEBUG_TINY, assert_user_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_12_steps(run_dir: Path, tiny_data: list[str]) -> Path:
    """debug-tiny for 12 steps, evaluated and checkpointed every 6: checkpoints at steps 6 and 12."""
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run_dir}",
            *tiny_data, "--set", "train.max_steps=12", "--set", "checkpoint.every=6", "--set", "eval.every=6"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def run12(tmp_path_factory, tiny_data) -> Path:
    return train_12_steps(tmp_path_factory.mktemp("report") / "run", tiny_data)


def _data_dir(tiny_data: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in tiny_data if a.startswith("run.data_dir="))) / "tiny"


def test_report_writes_one_self_contained_page(run12, tmp_path, tiny_data):
    out = tmp_path / "report"
    ref = run12 / "checkpoints" / "step_00000006"
    proc = run_cli("report", run12, "--out", out, "--reference", ref, "--data", _data_dir(tiny_data),
                   "--max-batches", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"Wrote {out / 'index.html'}" in proc.stdout
    for part in ("report: evaluating 2 model(s)", "report: generating 1 prompt(s)", "report: drawing the charts"):
        assert part in proc.stderr, proc.stderr  # progress while the slow parts run, on stderr
    page = (out / "index.html").read_text()
    # the curves are inside the page; the marker says `report` wrote the directory (so a re-run may replace it)
    assert sorted(p.name for p in out.iterdir()) == [".smoltrain-output.json", "index.html"]
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', page)
    assert [alt for _, alt in images] == ["loss", "learning rate", "throughput", "gradient norm (before clipping)"]
    assert all(base64.b64decode(data)[:8] == PNG_MAGIC for data, _ in images)
    assert "checkpoints kept at steps 6, 12" in page
    gens = page.split("<h2>Generations per checkpoint</h2>")[1].split("<h2>")[0]
    assert gens.count("ROMEO:") == 2  # the config's eval.prompts, once per kept checkpoint
    assert "<td class='num nowrap'>6</td>" in gens and "<td class='num nowrap'>12</td>" in gens
    assert "<table class=wide>" in gens
    assert "Perplexity on" in page and "this run (step 12)" in page and "step_00000006" in page
    assert "max_steps: 12" in page and "torch version" in page  # config.yaml and env.json
    assert "src=\"http" not in page and "<script" not in page and "<link" not in page  # self-contained


def test_report_val_loss_at_every_checkpoint(tmp_path, tiny_data):
    """A checkpoint saved between evaluations shows the nearest evaluation's val loss, with its step."""
    args = [sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), "--set",
            f"run.dir={tmp_path / 'run'}", *tiny_data, "--set", "train.max_steps=6", "--set", "checkpoint.every=3",
            "--set", "checkpoint.keep_last=5", "--set", "eval.every=4"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "report"
    proc = run_cli("report", tmp_path / "run", "--out", out, "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    gens = (out / "index.html").read_text().split("<h2>Generations per checkpoint</h2>")[1].split("<h2>")[0]
    cells = re.findall(r"<td class='num nowrap'>(\d+)</td><td class='num nowrap'>([^<]*)</td>", gens)
    labels = {int(step): val for step, val in cells}
    assert labels[3].endswith("(at step 4)")  # saved at 3, evaluated at 4 and at the end (6)
    assert re.fullmatch(r"\d+\.\d{4}", labels[6])  # step 6 was evaluated itself: no label
    assert "–" not in labels.values()


def test_report_prompts_option_and_escaping(run12, tmp_path):
    out = tmp_path / "r"
    proc = run_cli("report", run12, "--out", out, "--prompts", "The king", "<b>bold</b> & co",
                   "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    page = (out / "index.html").read_text()
    assert page.count(">The king</span>") == 2 and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    assert "<b>bold</b>" not in page and "up to 4 new tokens" in page


def test_report_bad_inputs_exit_2(run12, tmp_path):
    no_ckpt = tmp_path / "young"  # a run killed before its first checkpoint
    no_ckpt.mkdir()
    for name in ("metrics.jsonl", "config.yaml", "env.json"):
        shutil.copy(run12 / name, no_ckpt / name)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_user_error(run_cli("report", no_ckpt, "--out", out), "no checkpoints yet")
    assert_user_error(run_cli("report", tmp_path / "empty", "--out", out), "not a training run directory")
    assert_user_error(run_cli("report", run12 / "checkpoints" / "step_00000012", "--out", out),
                      "is a checkpoint, not a run directory", str(run12))
    assert_user_error(run_cli("report", tmp_path / "nope", "--out", out), "does not exist")
    assert_user_error(run_cli("report", run12, "--out", out, "--reference", tmp_path / "nope"), "does not exist")
    assert not out.exists()  # refused before writing anything


def test_export_card_describes_training(run12, tmp_path, tiny_ckpt):
    out = tmp_path / "hf"
    proc = run_cli("export", run12, "--out", out)
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC and "](loss.png)" in card
    assert card.splitlines()[5] == "# run (step 12)"  # the run's name, not the checkpoint dir's
    assert "(CPU, " in card and "x86_64" not in card  # the CPU's model name
    for needle in ("| parameters | ", "12 steps on 3,072 tokens", "### Data", "`tiny`", "### Hyperparameters",
                   "peak 0.003", "final training loss", "final validation loss", "## Intended use and limitations"):
        assert needle in card, needle
    imported = tmp_path / "hf2"  # a checkpoint without train_state.json: architecture and limits only
    proc = run_cli("export", tiny_ckpt, "--out", imported)
    assert proc.returncode == 0, proc.stderr
    card = (imported / "README.md").read_text()
    assert "## Intended use and limitations" in card and "## Training" not in card
    assert "losses above" not in card  # no training here, so no losses to speak of
    assert not (imported / "loss.png").exists()


def test_render_escapes_every_user_string(tmp_path):
    """Prompts, generated text, run names, config text, env values and errors are text, never markup."""
    from smoltrain.app.report import Run, render
    from smoltrain.history import History

    hostile = "<script>alert('x')</script> & co"
    run_dir = tmp_path / "<b>run&co"
    run_dir.mkdir()
    (run_dir / "samples.jsonl").write_text(json.dumps({"step": 3, "mode": "greedy", "prompt": hostile,
                                                      "text": "<i>t</i>"}) + "\n")
    run = Run(run_dir, {}, f"run:\n  name: {hostile}\n", {"host": hostile}, History(),
              [run_dir / "checkpoints" / "step_00000003"])
    gens = [{"step": 3, "val_loss": "–", "prompt": hostile, "text": " <img src=x>"},
            {"step": 3, "val_loss": "–", "prompt": "", "text": "", "error": "<corrupt> checkpoint"}]
    ppl = [{"model": hostile, "path": "p&q", "loss": 1.0, "ppl": 2.718, "bpb": 1.5, "tokens": 1024}]
    page = render(run, [], gens, [hostile], 4, ppl, tmp_path / "d&<x>", [])
    assert "<script" not in page and "<img" not in page and "<b>" not in page and "<i>" not in page
    assert page.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co") == 5  # prompt, sample, model, env, config
    assert "<title>smoltrain report: &lt;b&gt;run&amp;co</title>" in page
    assert "<span class=muted>&lt;corrupt&gt; checkpoint</span>" in page
    assert "Perplexity on " + str(tmp_path) + "/d&amp;&lt;x&gt; (val split)" in page
    assert "<td>p&amp;q</td><td class='num nowrap'>1.0000</td><td class='num nowrap'>2.72</td>" in page
    assert "<p class=muted>No metrics logged yet.</p>" in page and "Downstream tasks" not in page


def test_render_without_prompts_env_or_config(tmp_path):
    from smoltrain.app.report import Run, render
    from smoltrain.history import History

    run = Run(tmp_path, {}, "", {}, History(), [tmp_path / "step_00000001"])
    page = render(run, [("loss", "data:image/png;base64,AAAA")], [], [], 8, [], None)
    assert "No prompts: set eval.prompts in the config or pass --prompts." in page
    assert "No env.json in the run directory." in page and "<pre>No config.yaml in the run directory.</pre>" in page
    assert '<img src="data:image/png;base64,AAAA" alt="loss">' in page
    assert "Perplexity on" not in page and "Samples logged during training" not in page
