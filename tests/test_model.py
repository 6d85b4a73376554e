"""The model is SmolLM2 exactly: parity with transformers' Llama, parameter counts, losses, init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from smoltrain.model.llama import SmolLM2, build_model
from smoltrain.model.loss import chunked_cross_entropy
from smoltrain.presets import PRESETS, get_preset


def _hf_twin(model: SmolLM2) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_hf())).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(tied):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(tie_word_embeddings=tied)).eval()
    hf = _hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 50))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-5


def test_loss_matches_transformers():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    hf = _hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        ours = model(ids[:, :-1], labels=ids[:, 1:])
        theirs = hf(ids, labels=ids).loss  # HF shifts internally
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_parameter_counts():
    with torch.device("meta"):
        assert SmolLM2(get_preset("smollm2-135m")).num_params() == 134_515_008
        for name in PRESETS:
            cfg = get_preset(name)
            hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf()))
            assert SmolLM2(cfg).num_params() == sum(p.numel() for p in hf.parameters()), name


def test_presets_follow_released_configs():
    p = get_preset("smollm2-1.7b")
    assert p.num_key_value_heads == p.num_attention_heads == 32 and p.rope_theta == 130000.0
    assert get_preset("smollm2-360m").num_key_value_heads == 5
    assert all(PRESETS[n].max_position_embeddings == 8192 for n in PRESETS if n.startswith("smollm2"))


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_plain_loss_and_grads(tied):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(tie_word_embeddings=tied))
    ids = torch.randint(0, model.config.vocab_size, (2, 41))
    labels = torch.randint(0, model.config.vocab_size, (2, 41))
    labels[0, :7] = -100  # ignored positions count in neither loss
    plain = model(ids, labels=labels)
    plain.backward()
    g_plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(ids, labels=labels, loss_chunk=16)  # 82 tokens: 6 chunks, the last one partial
    chunked.backward()
    assert abs(plain.item() - chunked.item()) < 1e-6
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, g_plain[n], atol=1e-7, rtol=1e-5), n


def test_chunked_loss_sum_and_no_grad():
    torch.manual_seed(0)
    h, w = torch.randn(20, 8), torch.randn(30, 8)
    y = torch.randint(0, 30, (20,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum")
    with torch.no_grad():
        assert torch.allclose(chunked_cross_entropy(h, w, y, chunk=7, reduction="sum"), ref, atol=1e-5)


def test_init_weights_uses_config_std():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                     num_key_value_heads=2, initializer_range=0.05, vocab_size=2048)
    model = build_model(cfg)
    assert abs(model.model.embed_tokens.weight.std().item() - 0.05) < 0.003
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.05) < 0.003
    out_std = 0.05 / (2 * cfg.num_hidden_layers) ** 0.5
    assert abs(model.model.layers[0].self_attn.o_proj.weight.std().item() - out_std) < 0.003
    assert torch.all(model.model.norm.weight == 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight


class _CpuStorages(TorchDispatchMode):
    """The bytes and addresses of every CPU storage an op creates while active (in-place ops and views
    create none; an address freed and reused is counted again, as it was allocated again)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0
        self.addresses: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.nbytes += t.untyped_storage().nbytes()
                self.addresses.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("init", [True, False])
def test_meta_build_allocates_once_and_rope_not_in_state(init):
    """The weights are materialised once: the CPU memory created while building is the model's own
    (plus the small RoPE tables' temporaries), not a CPU-built copy replaced by another."""
    with _CpuStorages() as seen:
        model = build_model(get_preset("tiny"), init=init)
    own = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in [*model.parameters(), *model.buffers()]}
    assert set(own) <= seen.addresses  # every weight came from this build
    # a second copy would be 2x; the rest is the RoPE tables' temporaries (~0.3x on this tiny shape)
    assert sum(own.values()) <= seen.nbytes < 1.5 * sum(own.values()), (seen.nbytes, sum(own.values()))
    assert "rope_cos" not in model.state_dict()
    assert model.rope_cos.shape == (256, 16) and model.rope_cos.device.type == "cpu"


def test_auto_loss_chunk_is_the_default_and_picks_the_fused_path(monkeypatch):
    """A config that does not mention train.loss_chunk (debug-tiny included) gets the fused loss, sized
    for the shape on CPU; the plain loss only when asked for with 0; bad values are refused."""
    from smoltrain.config import load_config
    from smoltrain.errors import UserError
    from smoltrain.model import loss as loss_mod

    root = Path(__file__).parent.parent / "configs"
    for name in ("debug-tiny", "quickstart"):
        assert load_config(root / f"{name}.yaml").train.loss_chunk == "auto"
    cpu = torch.device("cpu")
    assert loss_mod.auto_chunk(2048, 49152, cpu) == 256  # the issue-6 shape: ~48 MB blocks, not one 400 MB one
    assert loss_mod.auto_chunk(4096, 2048, cpu) == 2048
    assert loss_mod.auto_chunk(100, 512, cpu) == 100  # never more rows than the batch has
    calls = []
    real = loss_mod.chunked_cross_entropy
    monkeypatch.setattr("smoltrain.model.llama.chunked_cross_entropy", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 41))
    auto = model(ids, labels=ids, loss_chunk="auto")
    assert calls == [82] and abs(auto.item() - model(ids, labels=ids).item()) < 1e-6
    for bad in ("-1", "big", "true"):
        with pytest.raises(UserError, match="train.loss_chunk"):
            load_config(root / "debug-tiny.yaml", [f"train.loss_chunk={bad}"])
