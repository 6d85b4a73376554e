"""Quality at a fixed compute budget: held-out bits per byte of quickstart-sized recipes, side by side.

    python bench/quality.py                                   # today's recipe beside the shipped quickstart
    python bench/quality.py --recipes today,muon,shipped --out bench/results.jsonl
    python bench/quality.py --recipes all --scale 0.2 --eval-tokens 32768  # a proxy: a fifth of the steps

Each recipe is `configs/quickstart.yaml` plus `--set` overrides, trained the way a user trains it
(`python -m smoltrain train --config ... --set ...` in a subprocess, one after another, never two at once),
and scored by the evaluation the trainer runs after its last step: the whole held-out split (the
held-out plays, both editions, as the config's data section chooses them; `--eval-tokens` caps it for
proxies). Training FLOPs follow smoltrain.train.runlog.flops_per_token, the count the trainer's MFU uses:
6 x N + 12 x layers x hidden x seq_len per token, where N is every matmul weight a token passes
through, the tied embedding counted once (as the LM head; the lookup is free) and the norms' gains left
out; times the tokens trained on (steps x global batch x seq_len). A recipe over
the budget is refused before anything runs. `--scale` multiplies max_steps, warmup and explicit decay
steps (a proxy at the same schedule ratios); its budget scales alike. Wall time is the train command's
and is only comparable within one invocation on a quiet machine; quality numbers are deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import emit, machine  # noqa: E402

from smoltrain.config import Config, load_config  # noqa: E402
from smoltrain.train.runlog import flops_per_token  # noqa: E402

# The quickstart's model/optim/train sections as of 2026-12-01 (2.76M parameters, AdamW 3e-3, WSD, 300 x 16 x 256),
# spelled out so that "today" stays today's recipe whatever configs/quickstart.yaml becomes.
TODAY = ["model.hidden_size=192", "model.intermediate_size=512", "model.num_hidden_layers=6",
         "model.num_attention_heads=3", "model.num_key_value_heads=1", "model.initializer_range=0.04",
         "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.1", "optim.schedule=wsd",
         "optim.warmup_steps=20", "optim.decay_style=linear", "optim.decay_start_step=null",
         "train.max_steps=300", "train.micro_batch_size=16", "train.seq_len=256"]
RECIPES: dict[str, list[str]] = {
    "today": TODAY,
    "shipped": [],  # configs/quickstart.yaml as it is
    "muon": [*TODAY, "optim.name=muon"],
    "muon-batch8": [*TODAY, "optim.name=muon", "train.micro_batch_size=8", "train.max_steps=600",
                    "optim.warmup_steps=40"],
    "muon-cool50": [*TODAY, "optim.name=muon", "optim.decay_start_step=150"],
    "adamw-lr6e-3": [*TODAY, "optim.lr=0.006"],
    "adamw-batch8": [*TODAY, "train.micro_batch_size=8", "train.max_steps=600", "optim.warmup_steps=40"],
    # half the width, 1.9x the tokens: at 0.45 tokens per parameter today's model is far from compute-optimal
    "muon-small": [*TODAY, "optim.name=muon", "model.hidden_size=128", "model.intermediate_size=384",
                   "model.num_attention_heads=2", "train.max_steps=560", "optim.warmup_steps=40"],
}
BUDGET = 2.6e13  # FLOPs: the quickstart's compute on 2026-12-01 (2.46e13), rounded up


def scaled(overrides: list[str], cfg: Config, scale: float) -> list[str]:
    """The overrides plus max_steps / warmup / explicit decay steps multiplied by `scale` (at least 1)."""
    if scale == 1.0:
        return overrides
    o = cfg.optim
    out = [*overrides, f"train.max_steps={max(1, round(cfg.train.max_steps * scale))}",
           f"optim.warmup_steps={round(o.warmup_steps * scale)}"]
    for name in ("decay_start_step", "decay_steps"):
        if getattr(o, name) is not None:
            out.append(f"optim.{name}={max(1, round(getattr(o, name) * scale))}")
    return out


def training_flops(cfg: Config) -> tuple[int, float]:
    """(tokens, FLOPs) of the run on one process: steps x micro x accum x seq_len tokens."""
    t = cfg.train
    tokens = t.max_steps * t.micro_batch_size * t.grad_accum_steps * t.seq_len
    return tokens, tokens * flops_per_token(cfg.model, t.seq_len)


def smoltrain(*args: str) -> subprocess.CompletedProcess:
    """This checkout's smoltrain, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "smoltrain", *args], capture_output=True, text=True, env=env)


def data_dir(work: Path, cfg: Config) -> Path:
    """One prepared data directory per distinct data section (and vocabulary), shared by recipes."""
    key = json.dumps([cfg.to_dict()["data"], cfg.model.vocab_size], sort_keys=True)
    return work / f"data-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def fresh_run_dir(work: Path, name: str) -> Path:
    """WORK/NAME, emptied first only if this benchmark made it (it holds our marker)."""
    run = work / name
    if run.exists():
        if not (run / ".bench-quality").exists():
            sys.exit(f"{run} exists and was not written by bench/quality.py; choose another --work.")
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / ".bench-quality").write_text("written by bench/quality.py\n")
    return run


def final_samples(run: Path) -> list[str]:
    path = run / "samples.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    last = max((r["step"] for r in recs), default=None)
    return [f"[{r['mode']}] {r['prompt']}{r['text']}" for r in recs if r["step"] == last]


def final_eval(run: Path, last_step: int) -> dict:
    """The evaluation the trainer runs after its last step (the whole held-out split unless eval.max_tokens)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    found = [r for r in recs if r.get("step") == last_step and "val_loss" in r]
    if not found:
        sys.exit(f"{run}/metrics.jsonl has no evaluation at step {last_step}")
    return found[-1]


def run_recipe(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    base = load_config(args.config, overrides)
    sets = scaled(overrides, base, args.scale)
    cfg = load_config(args.config, sets)
    tokens, flops = training_flops(cfg)
    if flops > args.budget * args.scale * (1 + 1e-9):
        sys.exit(f"recipe {name}: {flops:.3g} training FLOPs exceed the budget {args.budget * args.scale:.3g}")
    run = fresh_run_dir(args.work, name)
    data = data_dir(args.work, cfg)
    argv = ["train", "--config", str(args.config), *[x for s in sets for x in ("--set", s)],
            "--set", f"run.dir={run}", "--set", f"run.data_dir={data}", "--set", "log.progress=false"]
    # one evaluation, after the last step: the whole held-out split unless --eval-tokens caps it
    argv += ["--set", "eval.every=0", "--set", "eval.sample_every=0", "--set", "eval.tasks=[]",
             "--set", f"eval.max_tokens={args.eval_tokens or 'null'}"]
    t0 = time.perf_counter()
    proc = smoltrain(*argv)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"recipe {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    row = final_eval(run, cfg.train.max_steps)
    return {"bench": "quality", "recipe": name, "overrides": sets, "val_bpb": row.get("val_bpb"),
            "val_loss": row["val_loss"], "train_tokens": tokens,
            "train_flops": flops, "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
            "wall_s": round(wall, 1), "samples": final_samples(run)}


def table(rows: list[dict]) -> str:
    lines = ["| recipe | held-out bpb | held-out loss | train tokens | train FLOPs | wall (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"
        lines.append(f"| {r['recipe']} | {bpb} | {r['val_loss']:.4f} | {r['train_tokens']:,} | "
                     f"{r['train_flops']:.3g} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    p.add_argument("--recipes", default="today,shipped", help=f"comma-separated, or all ({', '.join(RECIPES)})")
    p.add_argument("--budget", type=float, default=BUDGET, help="training FLOPs a recipe may use (at --scale 1)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply steps (and the budget) for a short proxy")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="eval.max_tokens for every evaluation (default: the config's, the whole split; less for proxies)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quality")
    p.add_argument("--out", default=None, help="append one JSON line per recipe (e.g. bench/results.jsonl)")
    args = p.parse_args()
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    for n in names:  # every recipe resolves and fits the budget before the first one trains
        cfg = load_config(args.config, scaled(RECIPES[n], load_config(args.config, RECIPES[n]), args.scale))
        if training_flops(cfg)[1] > args.budget * args.scale * (1 + 1e-9):
            sys.exit(f"recipe {n}: {training_flops(cfg)[1]:.3g} training FLOPs exceed the budget")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in names:
        row = run_recipe(n, RECIPES[n], args)
        rows.append(row)
        emit({**row, "scale": args.scale}, args.out)
    print(f"\n{machine()}, {time.strftime('%Y-%m-%d')}, scale {args.scale}: "
          f"python bench/quality.py --recipes {','.join(names)} --scale {args.scale}\n")
    print(table(rows))
    for r in rows:
        print(f"\n{r['recipe']} samples:\n" + "\n".join(r["samples"][:4]))


if __name__ == "__main__":
    main()
