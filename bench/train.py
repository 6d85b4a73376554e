"""Training throughput: `smoltrain train` and smoltrain's train step vs a plain transformers loop.

    python bench/train.py [--rounds 3] [--steps 10] [--out bench/results.jsonl]        # CPU shape of issue 6
    python bench/train.py --preset smollm2-135m --micro-batch 16 --seq-len 2048 --dtype bf16 --compile  # GPU

Three sides, each in a fresh subprocess, ABBA-ordered rounds:
- `smoltrain train`: the real command (trainer, data loader, progress bar, metrics.jsonl, TensorBoard)
  with the shipped CPU recipe (configs/quickstart.yaml) set to this shape, on data prepared once before
  the rounds. Its speed is wall-clock: the time between the metrics.jsonl lines of two logged steps, read
  as they appear, so everything the loop does per step counts (start-up, the final eval and save do not).
- smoltrain step: model + fused loss + clip + AdamW in isolation, random tokens.
- transformers: the plain loop a user writes, random tokens.
The loop's overhead is 1 - (train's tokens/s) / (the isolated step's tokens/s).

Same shape, micro-batch, sequence length, AdamW (betas 0.9/0.95, wd 0.01), clip 1.0 and dtype for both.
Rounds run in ABBA order so that a drift in the host's speed hits both sides alike.
The baseline is what a user writes by hand: `logits = model(x).logits`, `F.cross_entropy` on fp32
logits, `torch.optim.AdamW`. Ours is smoltrain's path: SmolLM2 model, fused chunked head + loss,
`build_optimizer` (fused on CUDA, foreach on CPU). Each measurement runs in a fresh subprocess, the two
interleaved, so peak memory (max RSS on CPU, max allocated on CUDA) is per implementation.
FLOPs per token follow the PaLM / nanoGPT convention (6N incl. the LM head + 12*L*H*Q*T, see
smoltrain.train.runlog.flops_per_token). On CPU "MFU" is achieved FLOP/s over this machine's measured fp32
matmul peak (a 2048^3 matmul, timed in each worker right after its steps), since CPUs have no datasheet
peak worth the name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved  # noqa: E402

from smoltrain.config import ModelConfig, OptimConfig  # noqa: E402
from smoltrain.train.runlog import flops_per_token, peak_flops  # noqa: E402

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
    if impl == "smoltrain step":
        from smoltrain.model.llama import build_model
        from smoltrain.train.optim import build_optimizer

        model = build_model(cfg, device).train()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.01), device)
        chunk = a.loss_chunk if a.loss_chunk == "auto" else int(a.loss_chunk)
        loss_fn = lambda x, y: model(x, labels=y, loss_chunk=chunk)  # noqa: E731
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
    if a.worker == "smoltrain train":
        return train_worker(a)
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


QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def train_config(a, work: Path) -> Path:
    """The shipped CPU recipe (quickstart) at this bench's shape, batch and dtype, with the peer's AdamW, on a
    few documents; evaluation, sampling and the save fall after the last logged step (they are not per-step work)."""
    tree = yaml.safe_load(QUICKSTART.read_text())
    model = dataclasses.asdict(shape(a))
    model.update({k: tree["model"][k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id")})
    tree["model"] = model
    log_every = tree["log"]["every"]
    tree["train"].update(micro_batch_size=a.micro_batch, seq_len=a.seq_len, dtype=a.dtype, compile=a.compile,
                         max_steps=log_every * (1 + a.train_logs), device=a.device)
    if a.loss_chunk != "auto":
        tree["train"]["loss_chunk"] = int(a.loss_chunk)
    for dataset in tree["data"]["datasets"]:
        dataset.pop("val_documents", None)  # few documents here: a fractional split instead of named plays
    tree["data"].update(max_documents=8, val_fraction=0.125)
    # the peer's optimizer (AdamW, same betas, decay and lr), so both sides do the same work per step
    tree["optim"] = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "schedule": tree["optim"]["schedule"],
                     "warmup_steps": tree["optim"]["warmup_steps"]}
    tree["eval"].update(tasks=[])
    tree["eval"].update(every=0, sample_every=0)
    tree["checkpoint"]["every"] = 0
    tree["run"] = {"dir": str(work / "prep"), "data_dir": str(work / "data")}
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train_worker(a) -> None:
    """`smoltrain train` as a user runs it, in a child process. Its metrics.jsonl is read as it grows:
    tokens/s is the wall time between the first and last logged steps, so the loop's per-step work
    (loader, logging, progress bar, syncs) counts. Prints one JSON line."""
    run_dir = Path(a.work) / f"run-{os.getpid()}"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "smoltrain", "train", "--config", a.train_config, "--set", f"run.dir={run_dir}"]
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        seen, offset, pending = [], 0, ""
        metrics = run_dir / "metrics.jsonl"
        while True:
            done = proc.poll() is not None
            if metrics.exists():
                with open(metrics) as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                now = time.perf_counter()
                pending += chunk
                *lines, pending = pending.split("\n")
                seen += [(now, json.loads(line)) for line in lines if line.strip()]
            if done:
                break
            time.sleep(0.01)
    if proc.returncode != 0:
        sys.exit(f"smoltrain train failed:\n{run_dir.with_suffix('.log').read_text()[-3000:]}")
    steps = [(t, r) for t, r in seen if "loss" in r]
    (t0, first), (t1, last) = steps[0], steps[-1]
    busy = statistics.median(r["tokens_per_sec"] for _, r in steps[1:])
    mem = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(json.dumps({"tokens_per_sec": (last["tokens"] - first["tokens"]) / (t1 - t0), "peak_mem_gb": mem,
                      "device": "cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu",
                      "cpu_peak": cpu_matmul_peak(), "logged_tokens_per_sec": busy,
                      "steps": [first["step"], last["step"]]}))


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
    ap.add_argument("--loss-chunk", default="auto", help="smoltrain's fused-loss chunk (default: auto, as train)")
    ap.add_argument("--train-logs", type=int, default=2,
                    help="logged steps timed in `smoltrain train` (log.every apart, after one warm-up interval)")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train-config", default=None, help=argparse.SUPPRESS)
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
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = train_config(a, work)
        prep = subprocess.run([sys.executable, "-m", "smoltrain", "train", "--config", str(config), "--set",
                               "train.max_steps=1"], capture_output=True, text=True)  # tokenizer + data, once
        if prep.returncode != 0:
            sys.exit(f"preparing the data failed:\n{prep.stderr[-3000:]}")
        command = [sys.executable, __file__, *passthrough, "--work", tmp, "--train-config", str(config)]
        results = interleaved(command, ["smoltrain train", "smoltrain step", "transformers"], a.rounds)
    cfg = shape(a)
    fpt = flops_per_token(cfg, a.seq_len)
    device = results["smoltrain step"][0]["device"]
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
              "dtype": a.dtype, "compile": a.compile, "device": device,
              **({"logged_tokens_per_sec": round(statistics.median(r["logged_tokens_per_sec"] for r in runs), 1)}
                 if "logged_tokens_per_sec" in runs[0] else {})}, a.out)
    base = summary["transformers"]
    print(f"smoltrain train / transformers: {summary['smoltrain train'] / base:.2f}x; smoltrain step / "
          f"transformers: {summary['smoltrain step'] / base:.2f}x; loop overhead (1 - train / step): "
          f"{1 - summary['smoltrain train'] / summary['smoltrain step']:.1%}")


if __name__ == "__main__":
    main()
