"""Your own texts in one command: `train --config configs/quickstart.yaml --data DIR --data-ext .md`.

A folder of notes or code trains first try: the recipe's datasets are replaced (what named them is dropped,
saying so), a BPE is trained on the training documents, documents are held out and scored. A config with
several mistakes is refused with all of them in one message, each naming its fix, and leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from smoltrain.config import OwnTexts, load_config
from smoltrain.errors import UserError

from .conftest import assert_user_error, make_corpus_text, run_cli

ROOT = Path(__file__).parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY_STEPS = ["train.max_steps=2", "train.micro_batch_size=2", "train.seq_len=64", "eval.every=0",
              "checkpoint.every=0", "eval.sample_tokens=4", "log.progress=false", "data.num_proc=1"]


def notes_folder(root: Path) -> Path:
    """Twelve Markdown notes (and a stray .png that must be skipped)."""
    root.mkdir()
    for i, text in enumerate(make_corpus_text(12, seed=5, words_per_doc=(150, 300))):
        (root / f"note{i:02d}.md").write_text(f"# Note {i}\n\n{text}\n")
    (root / "figure.png").write_bytes(b"\x89PNG\r\n")
    return root


def code_folder(root: Path) -> Path:
    """Real Python: this package's own data modules, in a nested folder."""
    (root / "pkg").mkdir(parents=True)
    for src in sorted((ROOT / "src" / "smoltrain" / "data").glob("*.py")):
        (root / "pkg" / src.name).write_text(src.read_text())
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind, ext", [("notes", ".md"), ("code", ".py")])
def test_a_folder_of_md_or_py_files_trains_with_one_command(tmp_path, kind, ext):
    folder = notes_folder(tmp_path / kind) if kind == "notes" else code_folder(tmp_path / kind)
    files = sorted(folder.rglob(f"*{ext}"))
    sets = [a for s in TINY_STEPS for a in ("--set", s)]
    proc = run_cli("train", "--config", QUICKSTART, "--data", folder, "--data-ext", ext, *sets, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert f"data.datasets [shakespeare] -> [{kind}: {folder}]" in out
    assert "eval.tasks next-line:shakespeare dropped" in out
    run = tmp_path / "runs" / kind  # the quickstart's own run dir is left alone
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").exists()
    meta = json.loads((run / "data" / kind / "meta.json").read_text())
    assert meta["num_documents"] == len(files)  # every file read, the .png skipped
    assert meta["splits"]["val"]["num_documents"] == round(len(files) * 0.1)  # every 10th held out
    assert list(run.glob("data/tokenizer-bpe2048-*/tokenizer.json"))  # a BPE trained on the texts
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(isinstance(r.get("val_bpb"), float) for r in evals)  # held-out documents scored
    steps = [r for r in evals if "loss" in r]
    assert all(r["mem_gb"] > 0.05 for r in steps)  # peak RSS on CPU, not null


def test_the_shorthand_replaces_what_named_the_old_dataset(tmp_path):
    notes = notes_folder(tmp_path / "My Notes")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("data:\n  datasets: [{name: a, sources: [x]}, {name: b, sources: [y]}]\n"
                      "  stages: [{start_step: 0, weights: {a: 1, b: 1}}]\n"
                      "eval:\n  tasks: [next-line:a, other.jsonl]\n")
    notes_out: list[str] = []
    cfg = load_config(recipe, ["train.max_steps=3"], own=OwnTexts((str(notes),), (".md",)), notes=notes_out)
    assert [(d.name, d.sources, d.val_fraction) for d in cfg.data.datasets] == [("My-Notes", [str(notes)], 0.1)]
    assert cfg.data.stages == [] and cfg.eval.tasks == ["other.jsonl"] and cfg.data.text_extensions == [".md"]
    assert cfg.run.dir == "runs/My-Notes" and cfg.train.max_steps == 3
    said = "; ".join(notes_out)
    for needle in ("data.stages dropped", "eval.tasks next-line:a dropped", "run.dir runs/default -> runs/My-Notes"):
        assert needle in said, said
    kept = load_config(recipe, ["run.dir=elsewhere"], own=OwnTexts((str(notes),)), notes=[])
    assert kept.run.dir == "elsewhere" and kept.data.text_extensions == [".txt"]  # --set wins; .txt by default


def test_every_problem_in_one_message_before_any_work(tmp_path):
    """A folder of .md without --data-ext, a wrong type and a bad value: one exit-2 message naming each fix;
    no run dir, nothing downloaded."""
    notes = notes_folder(tmp_path / "notes")
    proc = run_cli("train", "--config", QUICKSTART, "--data", notes, "--set", "train.max_steps=0",
                   "--set", "data.train_tokenizer_vocab_size=null", cwd=tmp_path)
    assert_user_error(proc, "--data-ext .md", "data.text_extensions: [.md", "train.max_steps must be > 0",
                      "data.train_tokenizer_vocab_size must be int >= 0 (0: use data.tokenizer as is)")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_tokenizer_too_large_for_the_model_names_the_fixes(tmp_path):
    """train_tokenizer_vocab_size 0 with the SmolLM2 tokenizer (49152) and a 2048-token model: refused before
    the tokenizer is fetched, naming the tokenizer trained earlier for this run, training one, and 0 = off."""
    notes = notes_folder(tmp_path / "notes")
    trained = tmp_path / "runs" / "notes" / "data" / "tokenizer-bpe2048-0123abcd"
    trained.mkdir(parents=True)
    (trained / "tokenizer.json").write_text("{}")
    proc = run_cli("train", "--config", QUICKSTART, "--data", notes, "--data-ext", ".md",
                   "--set", "data.train_tokenizer_vocab_size=0", cwd=tmp_path)
    assert_user_error(proc, "assets:smollm2 has 49152 tokens but model.vocab_size is 2048",
                      f"data.tokenizer={Path('runs/notes/data/tokenizer-bpe2048-0123abcd')}",
                      "data.train_tokenizer_vocab_size=2048; 0 means off", "raise model.vocab_size to 49152")
    assert not (tmp_path / "runs" / "notes" / ".smoltrain.lock").exists()
    with pytest.raises(UserError, match="no dataset has sources to train on.*data.train_tokenizer_vocab_size: 0"):
        load_config(None, ["data.train_tokenizer_vocab_size=512", "model.vocab_size=512",
                           "data.datasets=[{name: p, path: prepared}]"])


def test_a_run_refused_during_setup_leaves_nothing_behind(tmp_path, monkeypatch, tiny_data):
    """The lock file and the directories the lock made go again; a foreign file (and its dir) stays."""
    import smoltrain.train.trainer as trainer_module

    def refuse(*args):
        raise UserError("refused in setup")

    monkeypatch.setattr(trainer_module, "setup_data", refuse)
    overrides = [tiny_data[i + 1] for i in range(0, len(tiny_data), 2)]
    fresh = tmp_path / "runs" / "fresh"
    with pytest.raises(UserError, match="refused in setup"):
        trainer_module.Trainer(load_config(ROOT / "configs" / "debug-tiny.yaml", [*overrides, f"run.dir={fresh}"]))
    assert not (tmp_path / "runs").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files smoltrain did not write"):  # refused before the lock
        trainer_module.Trainer(load_config(ROOT / "configs" / "debug-tiny.yaml", [*overrides, f"run.dir={busy}"]))
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_text_extensions_are_read_as_documents(tmp_path):
    from smoltrain.data.sources import iter_named_documents, resolve_source

    code_folder(tmp_path / "code")
    (tmp_path / "code" / "README.MD").write_text("# read me")
    with pytest.raises(UserError, match=re.escape("--data-ext .py")):
        resolve_source(tmp_path / "code")
    src = resolve_source(tmp_path / "code", (".py", ".md"))
    names = [d.name for d in iter_named_documents([src])]
    assert "README.MD" in names and "pkg/prepare.py" in names  # case-insensitive, one document per file
