"""`smoltrain demo`: served on 127.0.0.1, driven in a real headless Chromium, and clean refusals."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from smoltrain.errors import UserError

from .conftest import assert_user_error, run_cli
from .test_report import train_12_steps

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run12(tmp_path_factory, tiny_data) -> Path:
    return train_12_steps(tmp_path_factory.mktemp("demo") / "run", tiny_data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(run12):
    """`smoltrain demo RUN` as a user starts it, on a free port; stopped with Ctrl+C at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smoltrain", "demo", str(run12), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo did not answer within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_demo_answers_a_generation_request(demo_url):
    from gradio_client import Client

    client = Client(demo_url, verbose=False)
    a, b = client.predict("The king", "step_00000006", "step_00000012", 12, 1.0, 0, 1.0, 0, api_name="/generate")
    assert a.startswith("The king") and b.startswith("The king")
    assert len(a) > len("The king") and len(b) > len("The king")
    with pytest.raises(Exception, match="not .*in"):  # only the run's own checkpoints can be picked
        client.predict("x", "../../etc", "step_00000012", 4, 1.0, 0, 1.0, 0, api_name="/generate")


def test_browser_types_prompt_and_sees_text(demo_url):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium here (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    prompt = "Tomorrow the king"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(demo_url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#prompt textarea").fill(prompt, timeout=60_000)
            assert "step 6" in page.locator("#pick-a input").input_value()
            assert "step 12" in page.locator("#pick-b input").input_value()
            page.locator("#generate").click()
            for pane in ("a", "b"):
                page.wait_for_function(
                    "([sel, n]) => (document.querySelector(sel)?.value || '').length > n",
                    arg=[f"#out-{pane} textarea", len(prompt)], timeout=60_000)
                assert page.locator(f"#out-{pane} textarea").input_value().startswith(prompt)
            heights = [page.locator(f"#out-{pane} textarea").bounding_box()["height"] for pane in ("a", "b")]
            assert heights[0] == heights[1], heights  # the panes stay equal whatever each generated
        finally:
            browser.close()


def test_checkpoint_source_lists_run_and_refuses_other_paths(run12):
    from smoltrain.app.demo import CheckpointSource, interleave

    src = CheckpointSource(run12)
    labels = [label for label, _ in src.options()]
    assert labels[0].startswith("step 6 (val loss ") and labels[1].startswith("step 12 (val loss ")
    assert src.defaults() == ("step_00000006", "step_00000012")
    assert src.path("step_00000006") == run12 / "checkpoints" / "step_00000006"
    with pytest.raises(UserError):
        src.path("../../../etc")
    one = CheckpointSource(run12 / "checkpoints" / "step_00000006")  # a run's checkpoint: its run, it chosen
    assert one.defaults() == ("step_00000006", "step_00000006")
    assert list(interleave([iter("ab"), iter("xyz")])) == [["a", "x"], ["ab", "xy"], ["ab", "xyz"]]


def test_demo_bad_inputs_exit_2(run12, tmp_path):
    no_ckpt = tmp_path / "young"
    (no_ckpt / "checkpoints").mkdir(parents=True)
    for name in ("metrics.jsonl", "config.yaml"):
        shutil.copy(run12 / name, no_ckpt / name)
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("demo", no_ckpt, "--port", str(free_port())), "no checkpoints yet")
    assert_user_error(run_cli("demo", tmp_path / "empty", "--port", str(free_port())),
                      "not a smoltrain checkpoint, a run directory")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_user_error(run_cli("demo", run12, "--port", str(port)), f"127.0.0.1:{port}", "in use", "--port")


@pytest.fixture(scope="module")
def lively_ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny checkpoint whose next token depends on the context (init std 0.2), so a mixed-up KV cache shows."""
    from smoltrain.data.tokenizer import load_tokenizer
    from smoltrain.hf.interop import model_state, save_model_files
    from smoltrain.model.llama import build_model
    from smoltrain.presets import get_preset
    from smoltrain.storage import publish

    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(initializer_range=0.2)
    out = tmp_path_factory.mktemp("lively") / "ckpt"
    with publish(out, "import") as d:
        save_model_files(d, model_state(build_model(cfg)), cfg, load_tokenizer(tiny_tokenizer_dir))
    return out


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 5)])
def test_concurrent_requests_on_one_checkpoint_equal_their_solo_output(lively_ckpt, temperature, seed):
    """Both panes on one checkpoint, and two requests at once in threads: every stream owns its KV cache,
    so each output equals the same generation alone (greedy with no seed, and seeded sampling)."""
    import threading

    from smoltrain.app.demo import CheckpointSource, Generator, ModelCache
    from smoltrain.model.generate import SamplingConfig, generate

    source = CheckpointSource(lively_ckpt)
    cache = ModelCache(torch.device("cpu"))
    key = source.defaults()[1]
    model, tok = cache.get(source.path(key))
    prompts = ["The king", "Tomorrow and tomorrow and"]
    cfg = SamplingConfig(temperature, 0, 1.0)
    solo = [p + tok.decode(list(generate(model, tok.encode(p), 60, cfg, seed, [tok.eot_id]))) for p in prompts]
    run = Generator(source, cache)
    threads_before = torch.get_num_threads()
    results: dict[int, tuple[str, str]] = {}

    def request(i: int) -> None:
        for both in run(prompts[i], key, key, 60, temperature, 0, 1.0, seed):
            results[i] = both

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert solo[0] != solo[1]
    assert results[0] == (solo[0], solo[0])
    assert results[1] == (solo[1], solo[1])
    assert torch.get_num_threads() == threads_before  # decoding drops to one thread, the last one out restores
