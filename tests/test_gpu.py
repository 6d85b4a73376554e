"""CUDA paths: fp32 parity with the CPU, bf16 autocast, the fused loss's memory, fused AdamW, compile.

Skipped without CUDA (CI has none); run them on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from smoltrain.config import OptimConfig
from smoltrain.model.generate import SamplingConfig, generate
from smoltrain.model.llama import build_model
from smoltrain.presets import get_preset
from smoltrain.train.optim import build_optimizer

from .conftest import DEBUG_TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _tiny(seed: int = 0, device: torch.device | str = "cpu"):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny").replace(eos_token_id=None), device).eval()


def test_fp32_logits_on_cuda_match_cpu():
    cpu = _tiny()
    gpu = _tiny(device=CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randint(0, cpu.config.vocab_size, (2, 64))
    with torch.no_grad():
        diff = (gpu(x.to(CUDA)).cpu() - cpu(x)).abs().max().item()
    assert diff < 1e-4, diff


def test_bf16_autocast_loss_and_fused_loss_agree():
    model = _tiny(device=CUDA).train()
    x = torch.randint(0, model.config.vocab_size, (4, 128), device=CUDA)
    y = torch.roll(x, -1, dims=1)
    fp32 = model(x, labels=y).item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(x, labels=y)
        fused = model(x, labels=y, loss_chunk=128)
    assert abs(plain.item() - fp32) / fp32 < 2e-2
    assert abs(fused.item() - plain.item()) / plain.item() < 1e-2


def test_fused_loss_never_holds_the_full_logits():
    """(4096 tokens x 49152 vocab): the plain loss keeps fp32 logits (~0.8 GB) for backward, the fused one
    a (chunk, V) block at a time."""
    n, d, v = 4096, 576, 49152
    torch.manual_seed(0)
    h = (torch.randn(n, d, device=CUDA, dtype=torch.bfloat16) * 0.1).requires_grad_()
    w = (torch.randn(v, d, device=CUDA, dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = torch.randint(0, v, (n,), device=CUDA)

    def peak(fn) -> tuple[float, float]:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30, loss.item()

    from smoltrain.model.loss import chunked_cross_entropy

    plain_gb, plain = peak(lambda: F.cross_entropy((h @ w.t()).float(), y))
    fused_gb, fused = peak(lambda: chunked_cross_entropy(h, w, y, chunk=1024))
    assert abs(plain - fused) / plain < 1e-2
    assert fused_gb < plain_gb / 2, (fused_gb, plain_gb)


def test_fused_adamw_on_cuda():
    model = _tiny(device=CUDA).train()
    opt = build_optimizer(model, OptimConfig(lr=1e-3), CUDA)
    assert opt.defaults.get("fused") is True
    x = torch.randint(0, model.config.vocab_size, (2, 32), device=CUDA)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    model(x, labels=x).backward()
    opt.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)


def test_kv_cache_greedy_equals_no_cache_greedy_on_cuda():
    model = _tiny(device=CUDA)
    prompt = [5, 17, 200, 3, 99]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids], device=CUDA))[0, -1].argmax()))
    assert list(generate(model, prompt, 24, SamplingConfig(temperature=0))) == ids[len(prompt):]


def test_bf16_decode_on_cuda_and_inference_layout_keeps_logits(tiny_ckpt):
    """What `smoltrain generate` and the demo run on a GPU: bf16 weights, KV cache, sampling."""
    from smoltrain.hf.interop import load_model
    from smoltrain.model.generate import prepare_for_decode
    from smoltrain.model.llama import to_inference_layout

    model, tok, _ = load_model(tiny_ckpt, device=CUDA, dtype=torch.bfloat16)
    prepare_for_decode(model)  # a no-op on CUDA
    ids = list(generate(model, tok.encode("To be"), 16, SamplingConfig(temperature=0.8, top_k=20), seed=0))
    assert len(ids) <= 16 and all(0 <= i < model.config.vocab_size for i in ids)
    fp32 = _tiny(device=CUDA)
    x = torch.randint(0, fp32.config.vocab_size, (2, 32), device=CUDA)
    with torch.no_grad():
        before = fp32(x)
        to_inference_layout(fp32)  # the fused path falls back to torch matmuls off the CPU
        assert torch.allclose(fp32(x), before, atol=1e-5)


def test_train_bf16_compiled_on_cuda_learns_and_reports_mfu(tmp_path, tiny_data):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "smoltrain", "train", "--config", str(DEBUG_TINY), *tiny_data,
                           "--set", f"run.dir={run}", "--set", "train.device=cuda", "--set", "train.compile=true",
                           "--set", "train.loss_chunk=128"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 30 and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert json.loads((run / "env.json").read_text())["device"].startswith("cuda")
    if any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100")):
        assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in steps[1:])
