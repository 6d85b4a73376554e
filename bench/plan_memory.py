"""The plan's memory estimate against the real peak of the same training step, on CPU.

    python bench/plan_memory.py                 # the three shapes below, one subprocess each
    python bench/plan_memory.py --shape tiny    # one of them

For each shape, smoltrain.train.memory.measure_step runs the step on fake tensors (the plan's figure), then
a fresh process runs the same step for real (fp32, CPU: two steps, so the second has optimizer state) and
reports its peak resident memory (VmHWM) minus the resident memory just before the model was built.
glibc's malloc is told to serve every block over 64 KB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors
leave the resident set at once and the high-water mark is the tensors' peak, not the heap's history.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {  # name: (preset overrides, micro batch, seq_len, optimizer, activation checkpointing)
    "135m-6layers-b4x512": ({"num_hidden_layers": 6}, 4, 512, "adamw", False),
    "135m-b1x1024": ({}, 1, 1024, "adamw", False),
    # AdamW, not Muon: when Muon's Newton-Schulz still ran in bf16 on CPU (before CpuMuon) its real step took
    # over 45 minutes; BENCHMARKS.md's figures are for this shape
    "135m-12layers-b4x1024-ac": ({"num_hidden_layers": 12}, 4, 1024, "adamw", True),
}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def real_peak(name: str) -> int:
    """The peak bytes of two real training steps of `name`, above the process's resident set before."""
    import torch

    from smoltrain.config import OptimConfig
    from smoltrain.model.llama import build_model
    from smoltrain.presets import get_preset
    from smoltrain.train.optim import build_optimizer

    overrides, micro, seq_len, optim, ac = SHAPES[name]
    cfg = get_preset("smollm2-135m").replace(max_position_embeddings=2048, **overrides)
    torch.manual_seed(0)
    torch.ones(8) @ torch.ones(8)  # load the BLAS before the baseline
    base = _status_kb("VmRSS:")
    model = build_model(cfg).train()
    model.gradient_checkpointing = ac
    opt = build_optimizer(model, OptimConfig(name=optim), torch.device("cpu"))
    for _ in range(2):
        batch = torch.randint(0, cfg.vocab_size, (micro, seq_len + 1))
        loss = model(batch[:, :-1], labels=batch[:, 1:], loss_chunk=4096, reduction="sum") / (micro * seq_len)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (_status_kb("VmHWM:") - base) * 1024


def estimate(name: str) -> int:
    from smoltrain.config import OptimConfig
    from smoltrain.presets import get_preset
    from smoltrain.train.memory import measure_step

    overrides, micro, seq_len, optim, ac = SHAPES[name]
    cfg = get_preset("smollm2-135m").replace(max_position_embeddings=2048, **overrides)
    return measure_step(cfg, OptimConfig(name=optim), micro, seq_len, amp=False, activation_checkpointing=ac,
                        loss_chunk=4096).peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: all three")
    p.add_argument("--real", choices=sorted(SHAPES), help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    if a.real:
        print(json.dumps({"real": real_peak(a.real)}))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for name in a.shape or list(SHAPES):
        est = estimate(name)
        out = subprocess.run([sys.executable, __file__, "--real", name], env=env, capture_output=True, text=True,
                             check=True)
        real = json.loads(out.stdout.strip().splitlines()[-1])["real"]
        rows.append({"shape": name, "estimate_gib": round(est / 2**30, 3), "real_gib": round(real / 2**30, 3),
                     "error": round(est / real - 1, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return 0 if all(abs(r["error"]) <= 0.15 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
