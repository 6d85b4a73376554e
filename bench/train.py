"""Training throughput: smoltrain's train step vs a plain transformers LlamaForCausalLM loop.

    python bench/train.py [--rounds 3] [--steps 10] [--out bench/results.jsonl]        # CPU shape of issue 6
    python bench/train.py --preset smollm2-135m --micro-batch 16 --seq-len 2048 --dtype bf16 --compile  # GPU

Same shape, micro-batch, sequence length, AdamW (betas 0.9/0.95, wd 0.01), clip 1.0 and dtype for both.
Rounds run in ABBA order so that a drift in the host's speed hits both sides alike.
The baseline is what a user writes by hand: `logits = model(x).logits`, `F.cross_entropy` on fp32
logits, `torch.optim.AdamW`. Ours is smoltrain's path: SmolLM2 model, fused chunked head + loss,
`build_optimizer` (fused on CUDA, foreach on CPU). Each measurement runs in a fresh subprocess, the two
interleaved, so peak memory (max RSS on CPU, max allocated on CUDA) is per implementation.
FLOPs per token follow the PaLM / nanoGPT convention (6N incl. the LM head + 12*L*H*Q*T, see
smoltrain.metrics.flops_per_token). On CPU "MFU" is achieved FLOP/s over this machine's measured fp32
matmul peak (a 2048^3 matmul, timed in each worker right after its steps), since CPUs have no datasheet
peak worth the name.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved  # noqa: E402

from smoltrain.config import ModelConfig, OptimConfig  # noqa: E402
from smoltrain.metrics import flops_per_token, peak_flops  # noqa: E402

CPU_SHAPE = ModelConfig(vocab_size=49152, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                        rope_theta=10000.0, initializer_range=0.02)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shape(a) -> ModelConfig:
    if a.preset:
        from smoltrain.presets import get_preset

        return get_preset(a.preset).replace(max_position_embeddings=max(2048, a.seq_len), rope_theta=10000.0)
    return CPU_SHAPE


def build(impl: str, cfg: ModelConfig, device: torch.device, a):
    """(step function, model) for one implementation; the step runs forward, backward, clip, AdamW."""
    torch.manual_seed(0)
    dtype = DTYPES[a.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
    if impl == "smoltrain":
        from smoltrain.model import build_model
        from smoltrain.optim import build_optimizer

        model = build_model(cfg, device).train()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.01), device)
        loss_fn = lambda x, y: model(x, labels=y, loss_chunk=a.loss_chunk)  # noqa: E731
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf(), attn_implementation="sdpa")).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)

        def loss_fn(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    if a.compile:
        model.compile()

    def step(x, y):
        if autocast is not None:
            with autocast():
                loss = loss_fn(x, y)
        else:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def worker(a) -> None:
    """One measurement in this process: warm-up steps, then timed steps; prints one JSON line."""
    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    cfg = shape(a)
    step = build(a.worker, cfg, device, a)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (a.warmup + a.steps, a.micro_batch, a.seq_len + 1), generator=g)
    for i in range(a.warmup):
        step(data[i, :, :-1].to(device), data[i, :, 1:].to(device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.steps):
        loss = step(data[i, :, :-1].to(device), data[i, :, 1:].to(device))
    float(loss)
    sync()
    dt = time.perf_counter() - t
    mem = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    peak = cpu_matmul_peak() if device.type == "cpu" else None  # right after the steps: this host's speed now
    print(json.dumps({"tokens_per_sec": a.steps * a.micro_batch * a.seq_len / dt, "peak_mem_gb": mem,
                      "device": device.type, "cpu_peak": peak}))


def cpu_matmul_peak() -> float:
    x = torch.randn(2048, 2048)
    for _ in range(3):
        x @ x
    t = time.perf_counter()
    for _ in range(10):
        x @ x
    return 10 * 2 * 2048**3 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a model preset instead of the issue-6 CPU shape")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    passthrough = sys.argv[1:]
    if "--out" in passthrough:  # the workers print; only the parent writes the JSON lines
        i = passthrough.index("--out")
        del passthrough[i:i + 2]
    passthrough = [arg for arg in passthrough if not arg.startswith("--out=")]
    results = interleaved([sys.executable, __file__, *passthrough], ["smoltrain", "transformers"], a.rounds)
    cfg = shape(a)
    fpt = flops_per_token(cfg, a.seq_len)
    device = results["smoltrain"][0]["device"]
    summary = {}
    for impl, runs in results.items():
        tps = statistics.median(r["tokens_per_sec"] for r in runs)
        summary[impl] = tps
        if device == "cuda":
            peak, kind = peak_flops(torch.device("cuda"), DTYPES[a.dtype]), "datasheet"
            mfu = round(fpt * tps / peak, 4) if peak else None
        else:  # each round against the matmul peak its own process measured right after its steps
            peak = statistics.median(r["cpu_peak"] for r in runs)
            kind = f"measured fp32 matmul, median {peak / 1e9:.1f} GFLOP/s"
            mfu = round(statistics.median(fpt * r["tokens_per_sec"] / r["cpu_peak"] for r in runs), 4)
        emit({"bench": "train", "impl": impl, "tokens_per_sec": round(tps, 1),
              "mfu": mfu, "peak_kind": kind, "flops_per_token": fpt,
              "peak_mem_gb": round(max(r["peak_mem_gb"] for r in runs), 3), "rounds": [round(r["tokens_per_sec"], 1)
                                                                                      for r in runs],
              "shape": a.preset or "issue6-cpu", "micro_batch": a.micro_batch, "seq_len": a.seq_len,
              "dtype": a.dtype, "compile": a.compile, "device": device}, a.out)
    print(f"ratio smoltrain / transformers: {summary['smoltrain'] / summary['transformers']:.2f}x")


if __name__ == "__main__":
    main()
