"""What a training run tells its user: the run files and header, each logged step, the end summary.

Throughput counts the time spent in train_step only (evaluations and saves excluded), since the last
logged step. Only rank 0 writes or prints; the other ranks pass log=None and skip it all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from smoltrain.checkpoint.rundir import record_segment
from smoltrain.runinfo import environment
from smoltrain.train.runlog import RunLog, memory_gb, model_flops_utilization

if TYPE_CHECKING:
    from smoltrain.checkpoint.context import RunContext
    from smoltrain.config import Config


def print_header(cfg: Config, env: dict, num_params: int, world_size: int) -> None:
    """Versions, device, model size and the global batch arithmetic, before the first step."""
    train = cfg.train
    model = cfg.model
    versions = env["versions"]
    seqs = train.micro_batch_size * train.grad_accum_steps * world_size
    print(f"smoltrain {versions['smoltrain']} (git {env['git_sha'] or 'n/a'}), torch {versions['torch']}, "
          f"device {env['device']} ({env['device_name']})", flush=True)
    print(f"model: {num_params:,} parameters ({model.num_hidden_layers} layers, d={model.hidden_size}, "
          f"{model.num_attention_heads}/{model.num_key_value_heads} heads, vocab {model.vocab_size})")
    print(f"global batch = micro {train.micro_batch_size} x accum {train.grad_accum_steps} x world {world_size} "
          f"= {seqs} sequences x {train.seq_len} tokens = {seqs * train.seq_len:,} tokens/step; "
          f"{train.max_steps} steps")
    print(f"run dir: {cfg.run.dir} (resolved config in config.yaml)", flush=True)


def write_run_files(run_dir: Path, cfg: Config, device: torch.device, world_size: int, step: int,
                    resume_changes: list[str], num_params: int, recipe: str | Path | None = None) -> None:
    """config.yaml (unless it is the recipe itself: that is never rewritten; the resolved config is still in
    config_history.jsonl and every checkpoint), env.json and this segment's config history, then the run header."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"
    if recipe is None or Path(recipe).expanduser().resolve() != resolved.resolve():
        write_atomic(resolved, cfg.to_yaml())
    env = environment(device, world_size)
    write_atomic(run_dir / "env.json", json.dumps(env, indent=2))
    record_segment(run_dir, step, cfg.to_dict(), resume_changes)
    print_header(cfg, env, num_params, world_size)


def write_atomic(path: Path, text: str) -> None:
    """A run file replaced whole (a temp name, then rename): a kill never leaves a torn env.json for report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class StepLog:
    """Per-step records (metrics.jsonl through the RunLog) and the progress bar or line."""

    def __init__(self, run: RunContext, log: RunLog | None, bar: tqdm | None, tokens_seen: int):
        self.run = run
        self.log = log  # None on ranks other than 0
        self.bar = bar
        self.busy = 0.0  # seconds in train_step since the last logged step
        self.last_tokens = tokens_seen

    def step_done(self, seconds: float) -> None:
        self.busy += seconds
        if self.bar is not None:
            self.bar.update(1)

    def log_step(self, step: int, tokens_seen: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                 tokens_per_source: dict) -> None:
        """Reads loss and grad norm on the host: the only other sync of a step, and only at log steps."""
        tokens_per_sec = (tokens_seen - self.last_tokens) / max(self.busy, 1e-9)
        self.busy = 0.0
        self.last_tokens = tokens_seen
        if self.log is None:
            return
        loss = float(loss)
        grad_norm = float(grad_norm)
        run = self.run
        mfu = model_flops_utilization(run.cfg.model, run.cfg.train.seq_len, tokens_per_sec, run.device,
                                      run.amp_dtype, run.dist.world_size)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
               "mfu": mfu, "tokens": tokens_seen, "mem_gb": memory_gb(run.device),
               "tokens_per_source": tokens_per_source}
        self.log.log(rec)
        msg = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_sec:,.0f} tok/s"
        if mfu:
            msg += f" mfu {mfu:.1%}"
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
        else:
            print(f"step {step}/{run.cfg.train.max_steps} {msg}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(run_dir: Path, step: int, tokens_seen: int, seconds: float, tensorboard: bool, prompt: str,
            eval_data: Path | None) -> str:
    """Where everything is, the final held-out scores, and what to run next (rank 0)."""
    from smoltrain.checkpoint.discovery import newest_valid
    from smoltrain.history import History

    val = History.load(run_dir).last(evals=True) or {}
    newest = newest_valid(run_dir)
    lines = [f"\nDone: step {step}, {tokens_seen:,} tokens in {seconds / 60:.1f} min."]
    if isinstance(val.get("val_loss"), float):
        bpb = f", {val['val_bpb']:.3f} bits per byte" if isinstance(val.get("val_bpb"), float) else ""
        lines.append(f"Held-out (step {val['step']}): loss {val['val_loss']:.4f}{bpb}.")
    lines += [f"  checkpoint   {newest}", f"  metrics      {run_dir / 'metrics.jsonl'}",
              f"  samples      {run_dir / 'samples.jsonl'}"]
    if tensorboard:
        lines.append(f"  tensorboard  tensorboard --logdir {run_dir / 'tb'}")
    eval_line = f"  smoltrain eval {run_dir} --data {eval_data if eval_data is not None else 'DIR'}"
    lines += ["Next:", f"  smoltrain generate {run_dir} --prompt \"{prompt}\"", eval_line,
              f"  smoltrain export {run_dir} --out hf/{run_dir.name}",
              f"  smoltrain report {run_dir} --out report/{run_dir.name}",
              f"  smoltrain demo {run_dir}"]
    return "\n".join(lines)
