"""Generation: the KV cache changes nothing, greedy equals transformers, sampling knobs behave."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smoltrain.hf.interop import load_model
from smoltrain.model.generate import SamplingConfig, generate, generate_batch, sample, stream_text
from smoltrain.model.llama import build_model
from smoltrain.presets import get_preset

from .conftest import assert_user_error, run_cli

GREEDY = SamplingConfig(temperature=0)


def _model(seed=0, std=0.02):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny").replace(eos_token_id=None, initializer_range=std)).eval()


def _lively_model():
    """Weights large enough that the next token depends on the context (at std 0.02 the tiny model
    repeats one token whatever came before, which would hide a mixed-up KV cache)."""
    return _model(std=0.2)


def _greedy_no_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_no_cache_greedy():
    model = _model()
    prompt = [5, 17, 200, 3, 99, 42, 7]
    assert list(generate(model, prompt, 40, GREEDY)) == _greedy_no_cache(model, prompt, 40)


def test_greedy_equals_transformers_generate():
    model = _model(1)
    hf = LlamaForCausalLM(LlamaConfig(**model.config.to_hf())).eval()
    hf.load_state_dict(model.state_dict())
    prompt = [11, 22, 33, 44]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    assert list(generate(model, prompt, 30, GREEDY)) == out[0, len(prompt):].tolist()


def test_stops_at_eos_and_respects_max_new_tokens():
    model = _model()
    prompt = [5, 17, 200]
    free = list(generate(model, prompt, 20, GREEDY))
    assert len(free) == 20
    stop = free[5]
    first = free.index(stop)
    assert list(generate(model, prompt, 20, GREEDY, stop_ids=[stop])) == free[:first]


def test_seeded_sampling_is_reproducible():
    model = _model()
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    a = list(generate(model, [1, 2, 3], 25, cfg, seed=7))
    assert a == list(generate(model, [1, 2, 3], 25, cfg, seed=7))
    assert a != list(generate(model, [1, 2, 3], 25, cfg, seed=8))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample(logits, SamplingConfig(1.0, top_k=2), generator=g)) for _ in range(200)}
    assert seen_k == {0, 1}
    # softmax ~ [.64, .24, .09, .03, .01]: top_p .8 keeps the first two only
    seen_p = {int(sample(logits, SamplingConfig(1.0, top_p=0.8), generator=g)) for _ in range(200)}
    assert seen_p == {0, 1}


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits, history = torch.randn(1, 50), torch.tensor([[3, 7, 7, 20]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert int(sample(logits, SamplingConfig(0, repetition_penalty=1.3), history)) == int(ref.argmax())
    cfg = SamplingConfig(temperature=1.0, repetition_penalty=1.3)
    probs_ref = ref.softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, cfg, history, g) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=50).float() / 3000
    assert (freq - probs_ref[0]).abs().max() < 0.03


def test_stream_text_holds_back_partial_utf8(tiny_ckpt):
    _, tok, _ = load_model(tiny_ckpt)
    ids = tok.encode("naïve 東京 café")
    assert "".join(stream_text(iter(ids), tok.decode)) == tok.decode(ids)


def test_generate_cli_greedy_and_prompt_file(tiny_ckpt, tmp_path):
    proc = run_cli("generate", tiny_ckpt, "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    model, tok, _ = load_model(tiny_ckpt)
    expected = "To be" + tok.decode(list(generate(model, tok.encode("To be"), 8, GREEDY)))
    assert proc.stdout.rstrip("\n") == expected
    f = tmp_path / "prompts.txt"
    f.write_text("To be\nThe quick\n")
    proc = run_cli("generate", tiny_ckpt, "--prompt-file", f, "--temperature", "0", "--max-new-tokens", "4")
    assert proc.returncode == 0 and proc.stdout.count("=== prompt") == 2
    solo = ["To be" + tok.decode(list(generate(model, tok.encode("To be"), 4, GREEDY))),
            "The quick" + tok.decode(list(generate(model, tok.encode("The quick"), 4, GREEDY)))]
    assert proc.stdout.splitlines() == ["=== prompt 1/2 ===", solo[0], "=== prompt 2/2 ===", solo[1]]


def test_interleaved_generations_on_one_model_are_independent():
    """Each generate() call owns its KV cache: two streams advanced in turn on one model (the demo's two
    panes) equal their solo outputs, also when the shorter one ends first."""
    model = _lively_model()
    cfg = SamplingConfig(temperature=1.0, top_k=50)
    for sc, seeds in ((GREEDY, (None, None)), (cfg, (1, 2))):
        jobs = [([5, 17, 200, 3], 40, seeds[0]), ([9, 8], 12, seeds[1])]
        solo = [list(generate(model, p, n, sc, seed=s)) for p, n, s in jobs]
        streams = [generate(model, p, n, sc, seed=s) for p, n, s in jobs]
        got: list[list[int]] = [[], []]
        live = [0, 1]
        while live:
            for i in list(live):
                tid = next(streams[i], None)
                if tid is None:
                    live.remove(i)
                else:
                    got[i].append(tid)
        assert got == solo


def test_batched_generation_equals_one_by_one():
    """Prompts of different lengths decoded as one left-padded batch: each row's tokens are the ones
    generate() gives that prompt alone, greedy and seeded sampling, with stops and per-row budgets."""
    from smoltrain.model.generate import prepare_for_decode

    model = prepare_for_decode(_lively_model())
    prompts = [[5, 17, 200, 3, 99, 42, 7], [11], [8, 9, 10, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    greedy = generate_batch(model, prompts, 30, GREEDY)
    assert greedy == [list(generate(model, p, 30, GREEDY)) for p in prompts]
    assert all(len(g) == 30 for g in greedy) and len({tuple(g) for g in greedy}) == len(prompts)
    stop = greedy[0][3]  # one row stops early, the others go on
    assert generate_batch(model, prompts, 30, GREEDY, stop_ids=[stop]) == [
        list(generate(model, p, 30, GREEDY, stop_ids=[stop])) for p in prompts]
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2)
    seeds = [3, 4, 5, 6]
    sampled = generate_batch(model, prompts, 25, cfg, seeds)
    assert sampled == [list(generate(model, p, 25, cfg, seed=s)) for p, s in zip(prompts, seeds)]
    assert len({tuple(x) for x in sampled}) == len(prompts)
    near_end = [list(range(1, 250)), [4, 5]]  # tiny's context is 256: the long row gets 7 tokens
    assert [len(x) for x in generate_batch(model, near_end, 20, GREEDY)] == [7, 20]


def test_prompt_longer_than_context_is_a_user_error(tiny_ckpt):
    proc = run_cli("generate", tiny_ckpt, "--prompt", "To be, or not to be " * 200, "--max-new-tokens", "2")
    assert_user_error(proc, "max_position_embeddings")


def test_decode_layout_keeps_weights_and_tokens():
    from smoltrain.model.generate import prepare_for_decode

    model = _model()
    prompt = [5, 17, 200, 3]
    before = list(generate(model, prompt, 30, GREEDY))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_decode(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert list(generate(model, prompt, 30, GREEDY)) == before
    assert not any(p.requires_grad for p in model.parameters())  # frozen: inference only
    model.to(torch.float64)  # the fused copies are buffers, so conversions reach them too
    assert len(list(generate(model, prompt, 5, GREEDY))) == 5


def test_blas_products_equal_torch_and_fall_back_under_autograd():
    from smoltrain.model import blas

    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(9, 7)
    assert torch.allclose(blas.matmul(a, b.t()), a @ b.t(), atol=1e-6)  # a transposed (strided) operand
    x = torch.randn(2, 3, 7)
    assert torch.allclose(blas.matmul(x, b.t()), x @ b.t(), atol=1e-6)
    w = b.t().clone().requires_grad_()  # autograd wanted: torch computes, gradients flow
    blas.matmul(x, w).sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, x.reshape(-1, 7).sum(0)[:, None].expand(7, 9))
