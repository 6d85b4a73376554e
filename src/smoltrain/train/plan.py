"""`smoltrain plan`: what a recipe costs before a GPU is rented, offline, in seconds.

The model's parameters and FLOPs (runlog.flops_per_token, the count MFU uses), the tokens the recipe trains
on against the tokens its data holds (data.budget), memory per GPU for its micro batch measured on fake
tensors (train.memory), the largest micro batch each GPU kind fits, time and GPU-hours at an assumed MFU,
and the checkpoint's size. What cannot be known offline is said so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smoltrain.config import Config
from smoltrain.errors import UserError
from smoltrain.train.memory import GIB, StepMemory, fits, measure_steps, per_gpu
from smoltrain.train.runlog import PEAK_BF16_FLOPS, flops_per_token

# name: (memory as nvidia-smi reports it, the key of runlog.PEAK_BF16_FLOPS)
GPUS = {
    "L4": (23034 * 2**20, "L4"),
    "A10G": (23028 * 2**20, "A10G"),
    "A100-40GB": (40960 * 2**20, "A100"),
    "A100-80GB": (81920 * 2**20, "A100"),
    "H100": (81559 * 2**20, "H100"),
    "H200": (143771 * 2**20, "H200"),
}
# No GPU run of smoltrain has been measured yet (BENCHMARKS.md): 40% is an assumption, the figure the real-job
# issue uses for a well-fed H100; bench/gpu_check.py measures the real one.
ASSUMED_MFU = 0.40


@dataclass
class Plan:
    cfg: Config
    gpus: int
    strategy: str
    memory: dict[bool, StepMemory] = field(default_factory=dict)  # activation checkpointing -> step
    fits_somewhere: bool = True


def strategy_for(cfg: Config, gpus: int) -> str:
    s = cfg.parallel.strategy
    if gpus == 1:
        return "single"
    return "ddp" if s in ("auto", "single") else s


def gpu_names(name: str | None) -> list[str]:
    if name is None:
        return list(GPUS)
    match = [g for g in GPUS if g.lower() == name.lower()]
    if not match:
        raise UserError(f"Unknown GPU {name!r}; plan knows {', '.join(GPUS)} (memory as nvidia-smi reports it).")
    return match


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def model_lines(cfg: Config) -> list[str]:
    m = cfg.model
    emb = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    from smoltrain.train.setup import num_params

    total = num_params(cfg)
    t = cfg.train
    fpt = flops_per_token(m, t.seq_len)
    return [f"Model: {total:,} parameters ({emb:,} embedding{'' if m.tie_word_embeddings else ' and head'}, "
            f"{total - emb:,} non-embedding); {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_attention_heads}/{m.num_key_value_heads} heads, vocab {m.vocab_size}",
            f"FLOPs per token: {fpt:.3e} (6 x matmul weights + attention at seq_len {t.seq_len}: "
            "runlog.flops_per_token, the count the trainer's MFU uses)"]


def batch_lines(cfg: Config, gpus: int) -> list[str]:
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum_steps * gpus * t.seq_len
    total = per_step * t.max_steps
    flops = total * flops_per_token(cfg.model, t.seq_len)
    return [f"Tokens: {t.micro_batch_size} x {t.seq_len} x accum {t.grad_accum_steps} x {gpus} GPU"
            f"{'s' if gpus > 1 else ''} = {per_step:,} per step; {t.max_steps:,} steps = {total:,} tokens "
            f"({_count(total)}), {flops:.3e} training FLOPs"]


def data_lines(cfg: Config, gpus: int) -> list[str]:
    from smoltrain.data.budget import available, passes, planned_tokens

    d = cfg.data
    if not d.datasets:
        return ["Data: the config names no datasets."]
    if d.streaming:
        return ["Data: streamed from the sources (data.streaming): tokens available unknown; passes not tracked."]
    t = cfg.train
    planned = planned_tokens(cfg, t.micro_batch_size * t.grad_accum_steps * gpus)
    tok = _local_tokenizer(cfg)
    avail = {}
    for ds in d.datasets:
        if ds.name in planned:
            avail[ds.name] = available(cfg, ds, tok, _local_sources(ds.sources))
    out = [f"Data (data.max_epochs {d.max_epochs:g}: passes a run may make over each dataset):"]
    for name, p in passes(planned, avail).items():
        a = avail[name]
        have = f"{a.train_tokens:,}" if a.train_tokens is not None else "unknown"
        if p is None:
            verdict = "passes unknown"
        elif p > d.max_epochs:
            verdict = (f"{p:.2f} passes: more than data.max_epochs, train refuses it" if a.exact else
                       f"~{p:.2f} passes: more than data.max_epochs (train refuses it once prepared and exact)")
        else:
            verdict = f"{'' if a.exact else '~'}{p:.2f} passes"
        out.append(f"  {name}: {planned[name]:,} tokens planned from {have} training tokens ({a.how}): {verdict}")
    return out


def _local_sources(sources: list[str]) -> list[str] | None:
    """Sources as local paths, assets only where already fetched; None if any is a hub dataset."""
    from smoltrain.data.assets import FETCHERS, default_dir

    out = []
    for s in sources:
        if s.startswith("hf:"):
            return None
        if s.startswith("assets:"):
            key = {"shakespeare": "shakespeare"}.get(s.split(":", 1)[1])
            marker = default_dir() / FETCHERS[key][2] if key else None
            if marker is None or not marker.exists():
                return None
            from smoltrain.data.recipe import resolve_asset

            s = resolve_asset(s)
        out.append(s)
    return out


def _local_tokenizer(cfg: Config):
    """The run's tokenizer if it is here without a download or training (else None: an assumed ratio)."""
    from pathlib import Path

    from smoltrain.data.assets import GGUF_NAME, default_dir
    from smoltrain.data.recipe import resolve_asset
    from smoltrain.data.tokenizer import load_tokenizer

    spec = cfg.data.tokenizer
    if cfg.data.train_tokenizer_vocab_size > 0:
        return None
    if spec.startswith("assets:"):
        if not (default_dir() / GGUF_NAME).exists():
            return None
        spec = resolve_asset(spec)
    if not Path(spec).expanduser().exists():
        return None
    try:
        return load_tokenizer(spec)
    except (UserError, OSError, ValueError):
        return None


def measure(cfg: Config) -> dict[bool, StepMemory]:
    """The step at the recipe's micro batch, with and without activation checkpointing (configured first)."""
    t = cfg.train
    amp = t.dtype in ("auto", "bf16", "fp16")  # on a GPU 'auto' is bf16
    order = (t.activation_checkpointing, not t.activation_checkpointing)
    steps = measure_steps(cfg.model, cfg.optim, t.micro_batch_size, t.seq_len, amp, order, t.loss_chunk)
    return dict(zip(order, steps))


def memory_lines(plan: Plan) -> list[str]:
    t = plan.cfg.train
    o = plan.cfg.optim
    opt = "AdamW8bit (bitsandbytes; state by its formula)" if o.eight_bit else ("Muon + AdamW" if o.name == "muon" else "AdamW")
    amp = "bf16 autocast" if t.dtype in ("auto", "bf16", "fp16") else "fp32"
    out = [f"Memory per GPU at micro batch {t.micro_batch_size} x {t.seq_len}, {amp}, {opt}, "
           f"{plan.strategy} over {plan.gpus} (one eager step on fake tensors; FSDP/DDP parts derived from it):"]
    for ac in (t.activation_checkpointing, not t.activation_checkpointing):
        part = per_gpu(plan.memory[ac], plan.strategy, plan.gpus)
        tag = "configured" if ac == t.activation_checkpointing else "the alternative"
        out.append(f"  activation checkpointing {'on' if ac else 'off'} ({tag}): weights {_gib(part['weights'])}, "
                   f"grads {_gib(part['grads'])}, optimizer {_gib(part['optimizer'])}, activations "
                   f"{_gib(part['activations'])}, fused-loss block {_gib(part['loss_buffer'])}; peak "
                   f"{_gib(part['peak'])}")
    strategy = "fsdp" if plan.cfg.parallel.strategy == "fsdp" else "ddp"
    m = plan.memory[t.activation_checkpointing]
    worlds = ", ".join(f"{n} GPU{'s' if n > 1 else ''} {_gib(per_gpu(m, strategy if n > 1 else 'single', n)['peak'])}"
                       for n in (1, 2, 4, 8))
    out.append(f"  peak per GPU by GPU count ({strategy} when > 1, configured checkpointing): {worlds}")
    out.append("  A GPU also needs its CUDA context and allocator slack: a step fits when peak x 1.10 + 1 GiB <= the "
               "GPU's memory (an assumption until bench/gpu_check.py measures it); torch.compile usually needs less.")
    return out


MAX_MICRO = 4096  # the search stops here: larger micro batches are printed as "4096+"


def largest_micro_batch(m: StepMemory, strategy: str, gpus: int, gpu_bytes: int) -> int:
    best = 0
    for b in range(1, MAX_MICRO + 1):
        if not fits(per_gpu(m.at(b), strategy, gpus)["peak"], gpu_bytes):
            break
        best = b
    return best


def suggest(rows_per_gpu: int, largest: int) -> tuple[int, int]:
    """(micro batch, grad_accum_steps) keeping the recipe's sequences per GPU per step."""
    micro = max(b for b in range(1, min(largest, rows_per_gpu) + 1) if rows_per_gpu % b == 0)
    return micro, rows_per_gpu // micro


def gpu_lines(plan: Plan, names: list[str]) -> list[str]:
    cfg = plan.cfg
    t = cfg.train
    rows = t.micro_batch_size * t.grad_accum_steps
    total_flops = t.max_steps * rows * plan.gpus * t.seq_len * flops_per_token(cfg.model, t.seq_len)
    out = [f"GPUs ({plan.gpus} of a kind, {plan.strategy}; time at an assumed {ASSUMED_MFU:.0%} MFU of the bf16 "
           "dense peak: no GPU MFU of smoltrain is measured yet):"]
    fit_any = False
    for name in names:
        mem, key = GPUS[name]
        sizes = [largest_micro_batch(plan.memory[ac], plan.strategy, plan.gpus, mem) for ac in (False, True)]
        hours = total_flops / (PEAK_BF16_FLOPS[key] * ASSUMED_MFU * plan.gpus) / 3600
        micro_fits = sizes[int(t.activation_checkpointing)] >= t.micro_batch_size
        fit_any = fit_any or micro_fits
        ac = int(t.activation_checkpointing)
        if sizes[ac]:
            micro, accum = suggest(rows, sizes[ac])
            advice = f"use micro {micro} x accum {accum}"
        else:
            advice = "does not fit even at micro batch 1"
        shown = [f"{n}+" if n == MAX_MICRO else str(n) for n in sizes]
        out.append(f"  {name:<10} {mem / GIB:6.1f} GiB: largest micro batch {shown[0]} (checkpointing off) / "
                   f"{shown[1]} (on); {advice}; {'fits' if micro_fits else 'the recipe micro batch does NOT fit'}; "
                   f"{hours:,.1f} h, {hours * plan.gpus:,.1f} GPU-hours")
    plan.fits_somewhere = fit_any
    return out


def checkpoint_lines(plan: Plan) -> list[str]:
    m = plan.memory[plan.cfg.train.activation_checkpointing]
    size = m.weights + m.optimizer
    keep = plan.cfg.checkpoint.keep_last
    kept = f"keep_last {keep}: up to {(keep + 1) * size / 1e9:.1f} GB in the run dir while the next one is saved" if keep else "keep_last 0: every checkpoint is kept"
    return [f"Checkpoint: {size / 1e9:.2f} GB each on disk (fp32 weights {m.weights / 1e9:.2f} GB + optimizer state "
            f"{m.optimizer / 1e9:.2f} GB; the same in the object store); {kept}"]


def make_plan(cfg: Config, gpus: int, gpu: str | None) -> list[str]:
    """The plan's lines; UserError (exit 2) for an unknown GPU or a micro batch that fits none."""
    names = gpu_names(gpu)
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}.")
    from smoltrain.train.setup import with_global_batch

    cfg = with_global_batch(cfg, gpus)  # train.global_batch_size fixes sequences per step on any GPU count
    plan = Plan(cfg, gpus, strategy_for(cfg, gpus))
    plan.memory = measure(cfg)
    lines = model_lines(cfg) + batch_lines(cfg, gpus) + data_lines(cfg, gpus) + memory_lines(plan)
    lines += gpu_lines(plan, names) + checkpoint_lines(plan)
    if not plan.fits_somewhere:
        t = cfg.train
        peak = per_gpu(plan.memory[t.activation_checkpointing], plan.strategy, gpus)["peak"]
        raise UserError(f"The micro batch {t.micro_batch_size} x {t.seq_len} fits no GPU plan knows "
                        f"({', '.join(names)}): its step peaks at {_gib(peak)} per GPU ({plan.strategy} over {gpus}). "
                        "Lower train.micro_batch_size (raise grad_accum_steps to keep tokens per step), turn on "
                        "train.activation_checkpointing, or shard over more GPUs (parallel.strategy: fsdp, --gpus N).")
    lines.append("Unknown offline: the GPU's real MFU and the step time; a hub dataset's size before it is prepared "
                 "(unless its corpus card is known); the CUDA allocator's real overhead (bench/gpu_check.py).")
    return lines
