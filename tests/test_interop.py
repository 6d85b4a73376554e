"""Weights in and out: HF dir import, export -> transformers, and clear errors for bad artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from smoltrain.hf.gguf import _unpermute
from smoltrain.hf.interop import load_model

from .conftest import assert_user_error, run_cli


def test_export_loads_in_transformers_with_same_logits(tiny_ckpt, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("export", tiny_ckpt, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).exists(), name
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours, our_tok, _ = load_model(tiny_ckpt)
    text = "To be, or not to be"
    assert tok(text).input_ids == our_tok.encode(text)
    ids = torch.tensor([our_tok.encode(text)])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-5


def test_import_hf_dir_roundtrip(tiny_ckpt, tmp_path):
    torch.manual_seed(3)
    ours, tok, _ = load_model(tiny_ckpt)
    cfg = ours.config.replace(tie_word_embeddings=False)
    hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf())).eval()
    src = tmp_path / "hfsrc"
    hf.save_pretrained(src, safe_serialization=False)  # pytorch_model.bin, untied head
    tok.save(src)
    proc = run_cli("import", src, "--out", tmp_path / "ck")
    assert proc.returncode == 0, proc.stderr
    model, _, _ = load_model(tmp_path / "ck")
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-5
    assert_user_error(run_cli("import", src, "--out", tmp_path / "ck"), "already exists")


def test_unpermute_inverts_llama_cpp_permutation():
    heads, dim = 3, 8
    w = np.arange(heads * dim * 5, dtype=np.float32).reshape(heads * dim, 5)
    # llama.cpp's convert script: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, dim // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_unpermute(permuted, heads), w)


def test_bad_inputs_exit_2(tiny_ckpt, tmp_path):
    assert_user_error(run_cli("import", tmp_path / "nope", "--out", tmp_path / "o"), "does not exist")
    assert_user_error(run_cli("generate", tmp_path / "nope", "--prompt", "x"), "does not exist")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_user_error(run_cli("import", gpt2, "--out", tmp_path / "o"), "gpt2")
    assert not (tmp_path / "o").exists()
    # a GGUF of another architecture
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_user_error(run_cli("import", path, "--out", tmp_path / "o"), "gpt2")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert_user_error(run_cli("import", tmp_path / "junk.gguf", "--out", tmp_path / "o"), "gguf")


def test_corrupted_or_incomplete_checkpoint_exit_2(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    assert_user_error(run_cli("generate", bad, "--prompt", "x"), "model.safetensors", "corrupted")
    assert_user_error(run_cli("export", bad, "--out", tmp_path / "o"), "corrupted")
    missing = tmp_path / "missing"
    shutil.copytree(tiny_ckpt, missing)
    (missing / "config.json").unlink()
    assert_user_error(run_cli("generate", missing, "--prompt", "x"), "config.json", "missing")
    assert not (tmp_path / "o").exists()


def test_loaded_weights_sit_in_aligned_memory(tiny_ckpt):
    """safetensors hands back tensors at the file's 8-byte offsets; BLAS on some CPUs (AMD EPYC) rounds
    differently there, so a resumed run evaluated 1 ulp away from an uninterrupted one. Loading copies
    every tensor into freshly allocated (64-byte aligned) memory, as a fresh run's are."""
    from smoltrain.hf.interop import read_hf_weights

    raw = read_hf_weights(tiny_ckpt)
    assert any(t.data_ptr() % 64 for t in raw.values())  # the file's own layout: the case this guards
    model, _, _ = load_model(tiny_ckpt)
    assert [n for n, p in model.named_parameters() if p.data_ptr() % 64] == []
