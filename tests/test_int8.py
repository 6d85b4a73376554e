"""8-bit weight-only decoding: exact products of the quantised weights, the same CLI, its refusals, and the
quality bars on the real SmolLM2-135M (slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from smoltrain.model.generate import SamplingConfig, generate, prepare_for_decode
from smoltrain.model.int8_linear import GROUP, KERNEL_ROWS, Int8Linear, quantize
from smoltrain.model.llama import build_model
from smoltrain.presets import get_preset

from .conftest import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingConfig(temperature=0)


def _lively(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny").replace(eos_token_id=None, initializer_range=0.2)).eval()


def test_quantize_uses_each_blocks_own_range_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 2 * GROUP) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitude
    w[3, :GROUP] = 0.25  # a constant block
    q, scales, mins = quantize(w)
    assert q.dtype == torch.uint8 and scales.shape == mins.shape == (48, 2)
    blocks = q.view(48, 2, GROUP)
    live = torch.ones(48, 2, dtype=torch.bool)
    live[3, 0] = False
    assert bool((blocks.amin(2) == 0).all()) and bool((blocks.amax(2)[live] == 255).all())  # the whole grid
    deq = Int8Linear(q, scales, mins).dequantized()
    assert bool(((deq - w).abs().view(48, 2, GROUP) <= scales[..., None] / 2 + 1e-6).all())
    assert torch.equal(deq[3, :GROUP], w[3, :GROUP])
    q, scales, _ = quantize(torch.randn(4, GROUP + 8))  # a row the block does not divide is one block
    assert scales.shape == (4, 1)


def test_kernel_and_blas_paths_equal_the_dequantised_product():
    """A token (one row: 32 accumulators), a prompt or a batch (up to KERNEL_ROWS rows: 4 at a time, then the
    rest) takes numba's kernel, more rows take BLAS on the dequantised weight: the same product up to
    summation order, whichever loop a row count takes."""
    torch.manual_seed(0)
    lin = Int8Linear.of(torch.randn(300, 4 * GROUP) * 0.05)
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 7, KERNEL_ROWS, KERNEL_ROWS + 1):
            x = torch.randn(1, rows, 4 * GROUP)
            assert torch.allclose(lin(x), x @ lin.dequantized().t(), atol=1e-5, rtol=1e-5), rows
        w = torch.randn(7, GROUP + 8)  # an input width the block does not divide: one block per row
        odd = Int8Linear.of(w)
        for rows in (1, 5, KERNEL_ROWS + 1):
            x = torch.randn(rows, GROUP + 8)
            assert torch.allclose(odd(x), x @ w.t(), atol=0.02 * (GROUP + 8) ** 0.5), rows  # within the grid
            assert torch.allclose(odd(x), x @ odd.dequantized().t(), atol=1e-5, rtol=1e-5), rows


def test_int8_logits_equal_fp32_on_the_dequantised_weights():
    """Every projection and the head multiply by exactly their quantised weights (fused or not): the int8
    model equals an fp32 model holding the dequantised values, up to summation order."""
    ref = _lively()
    q8 = prepare_for_decode(_lively(), "int8")
    with torch.no_grad():
        for name, mod in q8.named_modules():
            if isinstance(mod, Int8Linear) and "fused" not in name:  # a new Parameter: the head is untied
                ref.get_submodule(name).weight = torch.nn.Parameter(mod.dequantized())
    assert isinstance(q8.model.layers[0].self_attn.fused_qkv, Int8Linear)
    x = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(q8(x), ref(x), atol=1e-4, rtol=1e-4)
    # the fp32 projection weights are gone: 1.25 bytes per weight instead of 4 is what makes it fast
    assert not any("proj" in k or "lm_head" in k for k in q8.state_dict())
    assert q8.model.embed_tokens.weight.dtype == torch.float32  # the lookup stays fp32


def test_int8_kv_cache_decode_equals_its_no_cache_greedy():
    model = prepare_for_decode(_lively(1), "int8")
    prompt = [5, 17, 200, 3, 99]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(generate(model, prompt, 20, GREEDY)) == ids[len(prompt):]


def test_generate_cli_int8_and_bad_weights(tiny_ckpt):
    args = ("generate", tiny_ckpt, "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "12")
    proc = run_cli(*args, "--weights", "int8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("To be") and run_cli(*args, "--weights", "int8").stdout == proc.stdout
    assert_user_error(run_cli(*args, "--weights", "int4"), "--weights", "int8")


def test_int8_is_refused_off_the_cpu_before_loading():
    from smoltrain.errors import UserError
    from smoltrain.model.generate import decode_weights
    assert decode_weights("auto", torch.device("cpu")) == "int8"  # the demo's default where it holds the bars
    assert decode_weights("auto", torch.device("meta")) == "fp32"
    with pytest.raises(UserError, match="CPU"):
        decode_weights("int8", torch.device("meta"))


def test_demo_decodes_int8_when_asked(tiny_ckpt):
    from smoltrain.app.demo import ModelCache

    cache = ModelCache(torch.device("cpu"), weights="int8")
    model, _ = cache.get(tiny_ckpt)
    assert cache.weights == "int8" and isinstance(model.lm_head, Int8Linear)
    assert ModelCache(torch.device("cpu"), weights="fp32").weights == "fp32"


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_real_smollm2_int8_holds_the_quality_bars(real_ckpt, tmp_path):
    """Held-out Shakespeare (Macbeth, SmolLM2's tokenizer): bpb within 1% of fp32, argmax equal at >= 98%."""
    q = _bench("int8_quality")
    ckpt = real_ckpt
    r = q.compare(ckpt, q.heldout_data(ckpt, tmp_path / "heldout"), max_tokens=4096)
    assert r["positions"] >= 4000
    assert abs(r["bpb_rel_change"]) <= 0.01, r
    assert r["argmax_agreement"] >= 0.98, r


def test_compiles_without_a_writable_cache_place(monkeypatch):
    """A read-only install and HOME leave numba no place for its disk cache, where it refuses `cache=True`
    outright: the kernels compile in memory instead."""
    import numpy as np
    from numba.core import caching

    from smoltrain.model import int8_linear

    def double(a):
        return a * 2

    monkeypatch.setattr(int8_linear, "_CACHE", True)
    assert isinstance(int8_linear._jit(double)._cache, caching.FunctionCache)  # normally: cached on disk
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    in_memory = int8_linear._jit(double)
    assert isinstance(in_memory._cache, caching.NullCache)
    assert in_memory(np.arange(3.0)).tolist() == [0.0, 2.0, 4.0]


def test_one_row_takes_its_own_loop_and_autograd_keeps_a_graph(monkeypatch):
    """A decoded token goes through the one-row loop (the fast one), a prompt through the several-row one;
    an input that wants gradients gets torch's product on the dequantised weight, in its own dtype."""
    from smoltrain.model import int8_linear

    lin = Int8Linear.of(torch.randn(40, 2 * GROUP))
    calls = []
    one_row = int8_linear._one_row()
    monkeypatch.setattr(int8_linear, "_one_row", lambda: lambda *a: calls.append(len(a[0])) or one_row(*a))
    with torch.inference_mode():
        lin(torch.randn(1, 1, 2 * GROUP))
        lin(torch.randn(1, 5, 2 * GROUP))
    assert calls == [1]
    x = torch.randn(2, 3, 2 * GROUP, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.shape == (2, 3, 40) and x.grad.shape == x.shape
    assert torch.allclose(x.grad[0, 0], lin.dequantized().sum(0), atol=1e-5)
    assert lin(x.detach().bfloat16().requires_grad_()).dtype == torch.bfloat16


def test_replaced_or_copied_buffers_are_the_ones_multiplied():
    """The layer keeps numpy views of its buffers for speed; an assigned buffer, .to() or a deep copy must not
    leave it multiplying by stale weights."""
    import copy

    def fresh(layer: Int8Linear) -> Int8Linear:  # the same values in new tensors: views made from scratch
        return Int8Linear(layer.qweight.clone(), layer.scales.clone(), layer.mins.clone())

    torch.manual_seed(0)
    lin = Int8Linear.of(torch.randn(16, GROUP))
    x = torch.randn(1, GROUP)
    with torch.inference_mode():
        before = lin(x)
        twin = copy.deepcopy(lin)
        twin.qweight.zero_()  # the copy's own buffer: the original is untouched
        assert torch.equal(lin(x), before)
        assert torch.allclose(twin(x), fresh(twin)(x), atol=1e-5)
        lin.qweight = torch.full_like(lin.qweight, 255)  # a new tensor assigned
        assert torch.allclose(lin(x), fresh(lin)(x), atol=1e-4)
        assert not torch.allclose(lin(x), before, atol=1e-2)
