"""`smoltrain export CKPT --space DIR`: the folder a stranger runs without smoltrain, its refusals, the push to a
Space repo (the fake Hub of test_hub.py), and (slow) a fresh venv built from its requirements.txt answering a
request through gradio_client with `smoltrain generate`'s greedy text."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from smoltrain.model import int8_linear

from .conftest import DEBUG_TINY, assert_user_error, run_cli
from .test_demo import free_port
from .test_hub import hub  # noqa: F401  (the fake Hub fixture)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A checkpoint as training leaves one (weights, tokenizer, the resolved config.yaml with eval.prompts),
    of a tiny model whose next token depends on the context (init std 0.2); no training: seconds, not minutes."""
    from smoltrain.config import load_config
    from smoltrain.data.tokenizer import load_tokenizer
    from smoltrain.hf.interop import model_state, save_model_files
    from smoltrain.model.llama import build_model
    from smoltrain.presets import get_preset
    from smoltrain.storage import publish

    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(initializer_range=0.2)
    config = load_config(DEBUG_TINY, ["eval.prompts=['ROMEO:', 'To be, or not']"]).to_dict()
    out = tmp_path_factory.mktemp("space") / "ckpt"
    with publish(out, "import") as d:
        save_model_files(d, model_state(build_model(cfg)), cfg, load_tokenizer(tiny_tokenizer_dir))
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    return out


@pytest.fixture(scope="module")
def space(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spaces") / "space"
    proc = run_cli("export", ckpt, "--space", out)
    assert proc.returncode == 0, proc.stderr
    return out


def _header(readme: Path) -> dict:
    _, header, _ = readme.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(header)


def test_space_folder_has_the_space_header_pins_and_the_runs_prompts(space, ckpt):
    from transformers import AutoModelForCausalLM

    assert {"README.md", "app.py", "requirements.txt", "space.json", "model"} <= {p.name for p in space.iterdir()}
    meta = _header(space / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    import gradio

    assert meta["sdk_version"] == gradio.__version__
    reqs = (space / "requirements.txt").read_text().split()
    assert reqs == ["torch==2.13.0", f"transformers=={__import__('transformers').__version__}",
                    f"gradio=={gradio.__version__}", f"numba=={__import__('numba').__version__}"]
    assert json.loads((space / "space.json").read_text())["examples"] == ["ROMEO:", "To be, or not"]
    assert (space / "model" / "README.md").read_text().startswith("---\nlibrary_name: transformers")  # the card
    AutoModelForCausalLM.from_pretrained(space / "model", local_files_only=True)
    imported = set()
    for code in ("app.py", "int8_linear.py"):  # the app and the 8-bit layer the export copies beside it
        tree = ast.parse((space / code).read_text())
        imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "smoltrain" not in imported and {"gradio", "torch", "transformers", "numba"} <= imported
    assert (space / "int8_linear.py").read_bytes() == Path(int8_linear.__file__).read_bytes()


def _app(space: Path):
    spec = importlib.util.spec_from_file_location("space_app_under_test", space / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_apps_int8_and_fp32_models_compute_smoltrains_logits(space):
    """app.py's int8 (transformers' Llama with its Linears swapped) equals `--weights int8`, for one token and
    a prompt (the kernel) and for a long input (the dequantised weights)."""
    from smoltrain.hf.interop import load_model
    from smoltrain.model.generate import prepare_for_decode

    app = _app(space)
    for weights in ("fp32", "int8"):
        theirs, _ = app.load(weights)
        ours = prepare_for_decode(load_model(space / "model")[0], weights)
        for x in (torch.randint(0, 512, (1, 20)), torch.randint(0, 512, (1, 1)), torch.randint(0, 512, (1, 80))):
            with torch.no_grad():
                assert torch.allclose(theirs(x).logits, ours(x), atol=1e-4), (weights, x.shape)


def test_space_refuses_a_foreign_dir_and_replaces_its_own_only_with_force(space, ckpt, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert_user_error(run_cli("export", ckpt, "--space", foreign), "--space", "not an output of smoltrain export")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    hf_export = tmp_path / "hf"
    assert run_cli("export", ckpt, "--out", hf_export).returncode == 0
    before = sorted(p.name for p in hf_export.iterdir())
    assert_user_error(run_cli("export", ckpt, "--space", hf_export), "smoltrain export")
    assert sorted(p.name for p in hf_export.iterdir()) == before
    stamp = (space / "app.py").stat().st_mtime_ns
    assert_user_error(run_cli("export", ckpt, "--space", space), "--force")
    assert (space / "app.py").stat().st_mtime_ns == stamp
    assert run_cli("export", ckpt, "--space", space, "--force").returncode == 0
    assert_user_error(run_cli("export", ckpt, "--space", tmp_path / "s", "--out", tmp_path / "o"), "--out")
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()


def test_space_push_creates_a_gradio_space_repo(hub, ckpt, tmp_path, capsys):  # noqa: F811
    from smoltrain.cli import main

    assert main(["export", str(ckpt), "--space", str(tmp_path / "sp"), "--push-to-hub", "me/smol-space"]) == 0
    create = next(r for r in hub.requests if r[1] == "/api/repos/create")
    assert create[0] == "POST"
    (commit,) = hub.commits
    assert commit["path"] == "/api/spaces/me/smol-space/commit/main"  # a Space repo, not a model repo
    files = commit["files"]
    assert {"README.md", "app.py", "requirements.txt", "space.json", "model/model.safetensors"} <= set(files)
    assert "manifest.json" not in files
    assert files["app.py"] == (tmp_path / "sp" / "app.py").read_bytes()
    assert "me/smol-space" in capsys.readouterr().out


def _fresh_venv(space: Path, where: Path) -> Path:
    """A venv with nothing but the Space's requirements.txt (no smoltrain, no system site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    python = where / "bin" / "python"
    # --no-compile: the same packages, without byte-compiling every file of torch and gradio up front
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", "-r", str(space / "requirements.txt")],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", "import smoltrain"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert probe.returncode != 0  # a stranger's machine: smoltrain is not there
    return python


@pytest.mark.slow
def test_space_runs_from_a_fresh_venv_and_answers_like_smoltrain_generate(space, ckpt, tmp_path):
    from gradio_client import Client

    python = _fresh_venv(space, tmp_path / "venv")
    port = free_port()
    # no WEIGHTS: space.json's default (int8) is what a stranger gets
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRADIO_SERVER_NAME", "WEIGHTS")}
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen([str(python), "app.py"], cwd=space, stdout=log, stderr=subprocess.STDOUT,
                           env={**env, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        deadline = time.monotonic() + 600
        while True:
            assert app.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert time.monotonic() < deadline, "the Space app did not answer within 600 s"
                time.sleep(2)
        prompt = json.loads((space / "space.json").read_text())["examples"][0]
        text = client.predict(prompt, 24, 0.0, 50, 0.95, 0, api_name="/generate")
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()
    assert "127.0.0.1" in (tmp_path / "app.log").read_text()  # loopback by default
    proc = run_cli("generate", ckpt, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24",
                   "--weights", "int8")
    assert proc.returncode == 0, proc.stderr
    assert text == proc.stdout[:-1]
    assert len(text) > len(prompt)
