"""Hostile stores, shared disks and careless hands (#24): names read from files stay inside their directory,
no command replaces a file it did not write, settings the end of a run uses are checked at its start, and
checkpoint state is checked against what holds it. Every bad input exits 2 with one paragraph, no
traceback, and leaves the tree it was given unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smoltrain import storage
from smoltrain.checkpoint.discovery import step_dir, step_of
from smoltrain.errors import UserError

from .conftest import DEBUG_TINY, SAMPLE_TEXT, assert_user_error, run_cli, s3


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a directory): "nothing written" is this unchanged."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(Path(root).rglob("*"))}


def refused(root: Path, *args: str, needles: tuple[str, ...] = ()) -> str:
    """Run the CLI; assert exit 2, no traceback, a short message naming `needles`, and `root` unchanged."""
    before = tree(root)
    proc = run_cli(*args)
    assert_user_error(proc, *needles)
    assert len(proc.stderr) < 2000, proc.stderr  # one paragraph, never an unbounded repr
    assert tree(root) == before
    return proc.stderr


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    return out


def set_manifest_files(ckpt: Path, files) -> None:
    doc = json.loads((ckpt / storage.MANIFEST).read_text())
    doc["files"] = files
    (ckpt / storage.MANIFEST).write_text(json.dumps(doc))


# --- 1. containment: manifests -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.txt", "../../../../etc/hostname", "/etc/hostname", "a/../../x"])
def test_checkpoint_manifest_naming_a_path_outside_is_refused(tmp_path, ckpt, name):
    (tmp_path / "outside.txt").write_text("a user's file")
    rec = storage.file_record(tmp_path / "outside.txt")
    set_manifest_files(ckpt, {**json.loads((ckpt / storage.MANIFEST).read_text())["files"], name: rec})
    err = refused(tmp_path, "generate", ckpt, "--prompt", "To be", "--max-new-tokens", "2",
                  needles=("not a plain relative name", name))
    assert "manifest.json entry" in err


def test_checkpoint_manifest_entry_through_a_symlink_leading_out_is_refused(tmp_path, ckpt):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.txt").write_text("secret")
    (ckpt / "evil").symlink_to(tmp_path / "secret")
    files = json.loads((ckpt / storage.MANIFEST).read_text())["files"]
    set_manifest_files(ckpt, {**files, "evil/key.txt": storage.file_record(tmp_path / "secret" / "key.txt")})
    refused(tmp_path, "generate", ckpt, "--prompt", "To be", needles=("leads outside", "evil/key.txt"))


@pytest.mark.parametrize("doc", ["[1, 2]", '"files"', '{"files": {"model.safetensors": 5}}', '{"files": [1]}'])
def test_checkpoint_manifest_of_the_wrong_json_shape_is_refused(tmp_path, ckpt, doc):
    (ckpt / storage.MANIFEST).write_text(doc)
    refused(tmp_path, "generate", ckpt, "--prompt", "To be", needles=(str(ckpt),))


def test_contained_accepts_plain_names_and_refuses_the_rest(tmp_path):
    assert storage.contained(tmp_path, "optimizer/state.safetensors") == tmp_path / "optimizer/state.safetensors"
    for bad in ["", "..", "../x", "/abs", "a/../../b", "a\\..\\..\\b", "nul\0byte", None, 5, ["x"]]:
        with pytest.raises(storage.Escape):
            storage.contained(tmp_path, bad)


# --- 1. containment: stores (file:// and S3) ---------------------------------------------------------

def _hostile_store_checkpoint(tmp_path: Path, tiny_ckpt: Path, put) -> Path:
    """A valid checkpoint whose store copy's manifest also lists `../../../escape.pth` (sha256 consistent:
    whoever writes the store writes the manifest)."""
    payload = tmp_path / "payload.pth"
    payload.write_text("import os  # a .pth in site-packages runs in every Python process\n")
    doc = json.loads((tiny_ckpt / storage.MANIFEST).read_text())
    doc["files"]["../../../escape.pth"] = storage.file_record(payload)
    for name in doc["files"]:
        src = payload if name.endswith("escape.pth") else tiny_ckpt / name
        put(src.read_bytes(), f"checkpoints/step_00000010/{name}")
    put(json.dumps(doc).encode(), "checkpoints/step_00000010/manifest.json")
    return payload


def _restore_refused(url: str, run: Path, options: dict | None = None) -> None:
    from smoltrain.checkpoint.remote import Remote

    before = tree(run.parent)
    with pytest.raises(UserError, match=r"unsafe.*escape\.pth.*not a plain relative name"):
        Remote(url, options).restore(run)
    assert tree(run.parent) == before  # no staging, no escape.pth anywhere under the test's tree
    assert not (run.parent.parent / "escape.pth").exists()


def test_file_store_whose_manifest_escapes_is_refused(tmp_path, tiny_ckpt):
    store = tmp_path / "store"

    def put(data: bytes, name: str) -> None:
        path = Path(os.path.normpath(store / name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    _hostile_store_checkpoint(tmp_path, tiny_ckpt, put)
    run = tmp_path / "deep" / "er" / "run"
    (run / "checkpoints").mkdir(parents=True)
    _restore_refused(f"file://{store}", run)


def test_s3_store_whose_manifest_escapes_is_refused(tmp_path, tiny_ckpt, s3_env, bucket, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    fs = s3(s3_env)
    _hostile_store_checkpoint(tmp_path, tiny_ckpt, lambda data, name: fs.pipe_file(f"{bucket}/r/{name}", data))
    run = tmp_path / "deep" / "er" / "run"
    (run / "checkpoints").mkdir(parents=True)
    _restore_refused(f"s3://{bucket}/r", run)


def test_store_manifest_that_is_not_an_object_is_skipped_not_crashed(tmp_path, capsys):
    from smoltrain.checkpoint.remote import Remote

    store = tmp_path / "store" / "checkpoints" / "step_00000010"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text("[1, 2, 3]")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert Remote(f"file://{tmp_path / 'store'}").restore(run) is None
    assert "no file list" in capsys.readouterr().err
    assert list((run / "checkpoints").iterdir()) == []


# --- 1. containment: meta.json shard names ------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from smoltrain.data.prepare import prepare

    from .conftest import make_corpus_text

    src = tmp_path_factory.mktemp("src")
    for i, doc in enumerate(make_corpus_text(16, seed=11, words_per_doc=(200, 300))):
        words = doc.split()
        (src / f"d{i}.txt").write_text("\n".join(" ".join(words[j:j + 7]) for j in range(0, len(words), 7)))
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare([src], tiny_tokenizer_dir, out, val_fraction=0.25, num_proc=1, progress=False, verbose=False)
    return out


@pytest.fixture
def data(tmp_path, prepared) -> Path:
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    return out


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", 7])
def test_meta_json_shard_outside_the_dataset_is_refused(tmp_path, ckpt, data, name):
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["shards"][0]["file"] = name
    (data / "meta.json").write_text(json.dumps(meta))
    refused(tmp_path, "eval", ckpt, "--data", data, needles=("meta.json shard",))


def test_meta_json_without_a_shard_list_is_refused(tmp_path, ckpt, data):
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["shards"] = "x" * 10_000
    (data / "meta.json").write_text(json.dumps(meta))
    refused(tmp_path, "eval", ckpt, "--data", data, needles=("no shard list", "(cut)"))


# --- 2. ownership: tasks next-line, assets ------------------------------------------------------------

def test_next_line_force_never_overwrites_the_datasets_own_files(tmp_path, data):
    refused(tmp_path, "tasks", "next-line", "--data", data, "--out", data / "meta.json", "--force",
            needles=("inside the prepared dataset",))
    refused(tmp_path, "tasks", "next-line", "--data", data, "--out", data / "new.jsonl", needles=("inside",))


def test_next_line_force_never_overwrites_a_users_file(tmp_path, data):
    (tmp_path / "notes.jsonl").write_text('{"context": "mine", "choices": ["a", "b"], "label": 0}\n')
    err = refused(tmp_path, "tasks", "next-line", "--data", data, "--out", tmp_path / "notes.jsonl", "--force",
                  needles=("not a next-line task smoltrain wrote", "even with --force"))
    assert "pass --force" not in err
    out = tmp_path / "task.jsonl"
    assert run_cli("tasks", "next-line", "--data", data, "--out", out, "--items", "5").returncode == 0
    refused(tmp_path, "tasks", "next-line", "--data", data, "--out", out, needles=("pass --force",))
    assert run_cli("tasks", "next-line", "--data", data, "--out", out, "--items", "5", "--force").returncode == 0


def test_assets_never_replace_a_users_texts_or_gguf(tmp_path):
    from smoltrain.data.assets import GGUF_NAME

    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "my_play.txt").write_text("my own play")
    refused(tmp_path, "assets", "--dir", tmp_path, needles=("shakespeare", "never replaced"))
    shutil.rmtree(tmp_path / "shakespeare")
    (tmp_path / GGUF_NAME).write_text("my own model")
    refused(tmp_path, "assets", "--dir", tmp_path, needles=(GGUF_NAME, "never overwritten"))


# --- 2, 3, 6, 7. train: refused before any work ---------------------------------------------------------

def train_args(run: Path, tiny_data: list[str], *sets: str) -> list[str]:
    extra = [x for s in sets for x in ("--set", s)]
    return ["train", "--config", str(DEBUG_TINY), "--set", f"run.dir={run}", *tiny_data, *extra]


def data_dir_of(tiny_data: list[str]) -> str:
    return next(v.split("=", 1)[1] for v in tiny_data if v.startswith("run.data_dir="))


TRAIN_REFUSALS = [
    (["run.dir="], "run.dir is empty"),
    (["run.dir=  "], "run.dir is empty"),
    (["checkpoint.remote=file://{run}"], "overlaps run.dir"),
    (["checkpoint.remote=file://{run}/store"], "overlaps run.dir"),
    (["checkpoint.remote=file://{tmp}"], "overlaps run.dir"),
    (["checkpoint.remote=file://{data_dir}"], "overlaps run.data_dir"),
    (["eval.prompts=['']"], "empty prompt"),
    (["eval.prompts=['ok', '   ']"], "empty prompt"),
    (["eval.tasks=[{tmp}/missing.jsonl]"], "does not exist"),
    (["eval.tasks=[no_such_suite]"], "unknown task"),
    (["eval.tasks=[{tmp}/bad.jsonl]"], "bad.jsonl line 1"),
    (["data.datasets=[{{name: a, sources: ['{tmp}/corpus'], weight: 0}}]"], "weights must sum"),
    (["data.datasets=[{{name: a, sources: ['{tmp}/corpus'], weight: 1e308}}, "
      "{{name: b, sources: ['{tmp}/corpus'], weight: 1e308}}]"], "weights must sum"),
    (["data.train_tokenizer_vocab_size=4096"], "exceeds model.vocab_size"),
    (["data.stages=[&a {{start_step: 0, weights: {{tiny: 1}}}}, *a]"], "aliases"),
]


@pytest.mark.parametrize("sets,needle", TRAIN_REFUSALS, ids=[n + str(i) for i, (_, n) in enumerate(TRAIN_REFUSALS)])
def test_train_refusals_come_before_any_work(tmp_path, tiny_data, sets, needle):
    run = tmp_path / "run"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": ["' + "y" * 5000 + '"], "label": 3}\n')
    sets = [s.format(run=run, tmp=tmp_path, data_dir=data_dir_of(tiny_data)) for s in sets]
    data_before = tree(Path(data_dir_of(tiny_data)))
    refused(tmp_path, *train_args(run, tiny_data, *sets), needles=(needle,))
    assert tree(Path(data_dir_of(tiny_data))) == data_before  # no tokenizer trained, nothing prepared


def test_run_dir_holding_a_users_files_or_being_a_file_is_refused(tmp_path, tiny_data):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("my notes\n")
    (run / "metrics.jsonl").write_text('{"step": 99, "mine": true}\n')
    refused(tmp_path, *train_args(run, tiny_data), needles=("holds files smoltrain did not write", "config.yaml"))
    refused(tmp_path, *train_args(run / "metrics.jsonl", tiny_data), needles=("is a file",))


def test_yaml_alias_bomb_and_huge_configs_are_refused_at_once(tmp_path):
    bomb = ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    bomb += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    t0 = time.perf_counter()
    refused(tmp_path, "train", "--config", tmp_path / "bomb.yaml", needles=("aliases",))
    assert time.perf_counter() - t0 < 30
    (tmp_path / "huge.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    refused(tmp_path, "train", "--config", tmp_path / "huge.yaml", needles=("characters",))


def test_prompt_longer_than_the_context_is_refused_before_training(tmp_path, tiny_data):
    run = tmp_path / "run"
    long = " ".join(["word"] * 400)
    proc = run_cli(*train_args(run, tiny_data, f"eval.prompts=['{long}']", "train.max_steps=2"))
    assert_user_error(proc, "eval.prompts", "Nothing was trained")
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_empty_or_blank_sources_do_not_train_a_tokenizer(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("   \n\n")
    (tmp_path / "src" / "b.jsonl").write_text('{"text": ""}\n')
    refused(tmp_path, "tokenizer", "train", "--source", tmp_path / "src", "--vocab-size", "300",
            "--out", tmp_path / "tok", needles=("no text",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 directory")
def test_unreadable_source_subdirectory_is_an_error(tmp_path):
    (tmp_path / "src" / "locked").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text(SAMPLE_TEXT)
    (tmp_path / "src" / "locked" / "b.txt").write_text(SAMPLE_TEXT)
    os.chmod(tmp_path / "src" / "locked", 0)
    try:
        refused(tmp_path, "tokenizer", "train", "--source", tmp_path / "src", "--vocab-size", "300",
                "--out", tmp_path / "tok", needles=("cannot read", "locked"))
    finally:
        os.chmod(tmp_path / "src" / "locked", 0o755)


def test_unreadable_source_subdirectory_is_never_skipped(tmp_path, monkeypatch):
    """As root a mode-000 directory is readable, so the walk's error is simulated: it must surface."""
    from smoltrain.data import sources

    (tmp_path / "src" / "locked").mkdir(parents=True)
    (tmp_path / "src" / "a.txt").write_text(SAMPLE_TEXT)
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match="Cannot read .*locked"):
        sources.resolve_source(tmp_path / "src")


# --- 2, 3, 4. runs that train: recipe kept, final save first, state checked ------------------------------

def test_recipe_at_run_config_yaml_is_never_rewritten(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    recipe = run / "config.yaml"
    recipe.write_text(DEBUG_TINY.read_text() + "# my recipe\n")
    proc = run_cli("train", "--config", recipe, "--set", f"run.dir={run}", *tiny_data, "--set", "train.max_steps=2",
                   "--set", "eval.every=0", "--set", "checkpoint.every=0")
    assert proc.returncode == 0, proc.stderr
    assert recipe.read_text().endswith("# my recipe\n")
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_final_checkpoint_is_saved_before_final_sampling(tmp_path, tiny_data, monkeypatch):
    from smoltrain.config import load_config
    from smoltrain.train.inloop import InLoopEval
    from smoltrain.train.trainer import Trainer

    def broken(self, step):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(InLoopEval, "samples", broken)
    sets = [v for v in tiny_data if v != "--set"]
    cfg = load_config(DEBUG_TINY, [*sets, f"run.dir={tmp_path / 'run'}", "train.max_steps=3", "eval.every=0",
                                   "checkpoint.every=0"])
    with pytest.raises(RuntimeError, match="sampling failed"):
        Trainer(cfg).train()
    assert storage.verify_manifest(step_dir(tmp_path / "run", 3))  # the run's weights are kept


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """A 4-step run with checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("train", "--config", DEBUG_TINY, "--set", f"run.dir={run}", *tiny_data, "--set",
                   "train.max_steps=4", "--set", "checkpoint.every=2", "--set", "eval.every=0")
    assert proc.returncode == 0, proc.stderr
    return run


def _tamper(run: Path, step: int, edit) -> None:
    """Edit a checkpoint's file and rewrite its manifest (a consistent manifest proves nothing)."""
    ckpt = step_dir(run, step)
    edit(ckpt)
    files = {str(p.relative_to(ckpt)): storage.file_record(p) for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != storage.MANIFEST}
    doc = json.loads((ckpt / storage.MANIFEST).read_text())
    doc["files"] = files
    (ckpt / storage.MANIFEST).write_text(json.dumps(doc))


def _state_edit(**changes):
    def edit(ckpt: Path) -> None:
        ts = json.loads((ckpt / "train_state.json").read_text())
        ts.update(changes)
        (ckpt / "train_state.json").write_text(json.dumps(ts))
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_state_edit(step=-5), "step is -5"),
    (_state_edit(step=2), "is not its directory's"),
    (_state_edit(step="4"), "step is '4'"),
    (_state_edit(tokens_seen=-1), "tokens_seen is -1"),
    (_state_edit(rewarm_from=99), "rewarm_from is 99"),
    (lambda c: (c / "train_state.json").write_text("[4]"), "holds list"),
])
def test_train_state_inconsistent_with_its_checkpoint_is_refused(tmp_path, trained, tiny_data, edit, needle):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _tamper(run, 4, edit)
    before = tree(run)
    proc = run_cli(*train_args(run, tiny_data, "train.max_steps=6"))
    assert_user_error(proc, needle, "step_00000004")
    assert tree(run) == before  # nothing moved aside, metrics.jsonl not rewound


def test_nan_optimizer_state_is_named_with_the_way_out(tmp_path, trained, tiny_data):
    from safetensors.torch import load_file, save_file

    def poison(ckpt: Path) -> None:
        path = ckpt / "optimizer" / "state.safetensors"
        tensors = load_file(str(path))
        name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
        tensors[name][0] = float("nan")
        save_file(tensors, str(path))

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _tamper(run, 4, poison)
    before = tree(run / "checkpoints")
    proc = run_cli(*train_args(run, tiny_data, "train.max_steps=6"))
    assert_user_error(proc, "NaN or Inf", "step_00000002")
    assert "Lower optim.lr" not in proc.stderr
    assert tree(run / "checkpoints") == before


# --- 5. staging dirs: removed only when provably dead ---------------------------------------------------

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_staging_of_a_writer_in_another_pid_namespace_is_never_removed(tmp_path):
    """The PID in the name is not visible here (another container), but the writer holds the lock."""
    staging = tmp_path / ".staging-out-999999999-0123abcd"
    staging.mkdir()
    (staging / "part.bin").write_bytes(b"half written")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(staging / storage.STAGING_LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert storage.clean_stale(tmp_path) == [] and (staging / "part.bin").exists()
    finally:
        holder.kill()
        holder.wait()
    assert storage.clean_stale(tmp_path) == [staging]  # its lock is free now: provably dead


def test_lockless_staging_with_content_waits_for_its_grace(tmp_path):
    staging = tmp_path / ".staging-out-999999999-0123abcd"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")  # a writer in its commit (lock file already unlinked)
    assert storage.clean_stale(tmp_path) == []
    old = time.time() - storage.LOCKLESS_GRACE_S - 60
    os.utime(staging, (old, old))
    assert storage.clean_stale(tmp_path) == [staging]


def test_publish_holds_the_staging_lock_and_leaves_no_lock_file(tmp_path):
    with storage.publish(tmp_path / "out", "assets", hashed=False) as staging:
        (staging / "a.txt").write_text("a")
        assert storage.clean_stale(tmp_path) == []  # our own, locked
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [storage.MARKER, "a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- 7. reading a run that is still training ------------------------------------------------------------

def test_loading_a_live_run_retries_when_retention_deletes_the_checkpoint(tmp_path, tiny_ckpt, monkeypatch):
    """export/eval/generate RUN while it trains: retention may delete the newest checkpoint between
    resolving and reading it; the run's newest one is then read instead of failing on a missing file."""
    from smoltrain.hf import interop

    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(tiny_ckpt, step_dir(run, step))
    real = interop.read_hf_config
    calls = []

    def racing(directory):
        calls.append(directory.name)
        step = step_of(directory)
        if step in (4, 8):  # the trainer saves the next step and retention deletes this one under the reader
            shutil.copytree(tiny_ckpt, step_dir(run, step + 2))
            storage.remove_dir(directory)
        return real(directory)

    monkeypatch.setattr(interop, "read_hf_config", racing)
    _, tok, used = interop.load_model(run)
    assert calls == ["step_00000004", "step_00000006"] and used == step_dir(run, 6) and tok is not None
    out = tmp_path / "export"
    shutil.copytree(tiny_ckpt, step_dir(run, 8))
    assert interop.export_hf(run, out) == out and (out / "model.safetensors").exists()
    assert calls[2:] == ["step_00000008", "step_00000010"]
    assert "step_00000010" in json.loads((out / storage.MARKER if (out / storage.MARKER).exists()
                                          else out / storage.MANIFEST).read_text())["source"]


# --- 7. refusals that used to come after a tokenizer was trained or data prepared -------------------------

def test_init_from_of_another_shape_is_refused_before_data(tmp_path, tiny_data, tiny_ckpt):
    run = tmp_path / "run"
    data_before = tree(Path(data_dir_of(tiny_data)))
    refused(tmp_path, *train_args(run, tiny_data, f"train.init_from={tiny_ckpt}", "model.hidden_size=128"),
            needles=("another shape",))
    assert tree(Path(data_dir_of(tiny_data))) == data_before


def test_changed_max_documents_is_refused_before_a_tokenizer_is_trained(tmp_path, tiny_data, trained):
    data = Path(data_dir_of(tiny_data))
    before = tree(data)
    refused(tmp_path, *train_args(tmp_path / "run", tiny_data, "data.max_documents=5",
                                  "data.train_tokenizer_vocab_size=300"), needles=("max_documents", "None there"))
    assert tree(data) == before  # no tokenizer-bpe300-* directory


# --- 7. traceback families: each one paragraph, exit 2 ---------------------------------------------------

@pytest.mark.parametrize("name,content", [
    ("bad.jsonl.gz", b"\x1f\x8b\x08\x00 this is not really gzip"),
    ("trunc.jsonl.gz", None),
    ("bad.parquet", b"PAR1 garbage, not a parquet footer"),
])
def test_corrupt_compressed_or_columnar_sources_are_refused(tmp_path, name, content):
    import gzip

    (tmp_path / "src").mkdir()
    if content is None:  # a gzip cut in half
        content = gzip.compress(b"".join(json.dumps({"text": SAMPLE_TEXT}).encode() + b"\n" for _ in range(50)))
        content = content[: len(content) // 2]
    (tmp_path / "src" / name).write_bytes(content)
    refused(tmp_path, "tokenizer", "train", "--source", tmp_path / "src", "--vocab-size", "300",
            "--out", tmp_path / "tok", needles=(name,))


def test_data_dir_blocked_by_a_file_and_a_model_too_big_to_build_are_refused(tmp_path, tiny_data):
    (tmp_path / "afile").write_text("x")
    sets = [x for pair in zip(tiny_data[::2], tiny_data[1::2]) if not pair[1].startswith("run.data_dir=") for x in pair]
    refused(tmp_path, *train_args(tmp_path / "run", sets, f"run.data_dir={tmp_path / 'afile' / 'data'}"),
            needles=("blocked by a file", "afile"))
    refused(tmp_path, *train_args(tmp_path / "run", tiny_data, "model.hidden_size=1048576",
                                  "model.intermediate_size=4194304"), needles=("more than this machine",))


def test_binary_prompt_file_is_refused(tmp_path, ckpt):
    (tmp_path / "prompts.bin").write_bytes(bytes(range(256)) * 4)
    refused(tmp_path, "generate", ckpt, "--prompt-file", tmp_path / "prompts.bin", needles=("not UTF-8",))


def test_push_to_hub_without_network_is_refused(tmp_path, ckpt):
    env = {**os.environ, "HF_TOKEN": "hf_fake", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-m", "smoltrain", "export", str(ckpt), "--push-to-hub", "me/model"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert_user_error(proc, "me/model")


def test_torn_env_json_does_not_break_the_report(tmp_path, trained):
    from smoltrain.app.report import open_run

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "env.json").write_text('{"torch": "2.')  # killed mid-write by an older smoltrain
    assert open_run(run).env == {}
    assert json.loads((trained / "env.json").read_text())  # what train writes now is whole (atomic)


def test_held_out_glob_matching_every_file_is_refused_before_any_work(tmp_path, tiny_data):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(SAMPLE_TEXT)
    data_before = tree(Path(data_dir_of(tiny_data)))
    refused(tmp_path, *train_args(tmp_path / "run", tiny_data,
                                  f"data.datasets=[{{name: a, sources: ['{tmp_path}/corpus'], val_documents: ['d*']}}]"),
            needles=("match every file",))
    assert tree(Path(data_dir_of(tiny_data))) == data_before


def test_run_dir_may_hold_smoltrain_outputs_and_the_recipe_but_nothing_foreign(tmp_path):
    from smoltrain.checkpoint.rundir import check_run_dir

    run = tmp_path / "run"
    with storage.publish(run / "data", "prepare", hashed=False) as d:
        (d / "meta.json").write_text("{}")
    (run / "config.yaml").write_text("train: {max_steps: 2}\n")
    check_run_dir(run, recipe=run / "config.yaml")  # prepare --out RUN/data, then --config RUN/config.yaml
    with pytest.raises(UserError, match="config.yaml"):
        check_run_dir(run)  # the same file when it is not the recipe: a user's file train would overwrite
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        check_run_dir(run, recipe=run / "config.yaml")
