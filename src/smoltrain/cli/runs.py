"""Commands on runs: train, eval, report, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from smoltrain import domain
from smoltrain.checkpoint.discovery import check_model_path
from smoltrain.cli.args import DEVICE, POSITIVE, out_dir, ranged, text_extensions
from smoltrain.errors import UserError


def train_cli(a: argparse.Namespace) -> int:
    """`smoltrain train --config YAML [--data PATH ...] [--set K=V ...]`; the process group is torn down on
    any exit. Config and input problems come in one message before anything is written or fetched, and
    before torch is imported (a second and a half to three seconds): a refused run answers at once."""
    from smoltrain.config import OwnTexts, load_config
    from smoltrain.data.recipe import input_problems

    own = OwnTexts(tuple(a.data), a.data_ext or ()) if a.data else None
    if a.data_ext and not a.data:
        a.set = [f"data.text_extensions=[{', '.join(a.data_ext)}]", *a.set]
    notes: list[str] = []
    checks = () if a.print_config else (input_problems,)
    cfg = load_config(a.config, a.set, own=own, checks=checks, notes=notes)
    if a.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if notes and os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print("Training on your own texts: " + "; ".join(notes) + ".", flush=True)
    from smoltrain import distributed
    from smoltrain.train.trainer import Trainer

    try:
        return Trainer(cfg, recipe=a.config).train()
    finally:
        distributed.teardown()


def config_keys_cli(a: argparse.Namespace) -> int:
    """`smoltrain config keys [SECTION]`: every key with its type, default and allowed values."""
    from smoltrain.config import config_keys

    rows = config_keys(a.section)
    width = max(len(key) for key, _, _ in rows)
    for key, kind, default in rows:
        print(f"{key:<{width}}  {kind}  (default {default})")
    return 0


def plan_cli(a: argparse.Namespace) -> int:
    """`smoltrain plan --config YAML [--set ...] [--gpus N] [--gpu NAME]`: the recipe's costs, offline."""
    from smoltrain.config import load_config
    from smoltrain.train.plan import make_plan

    cfg = load_config(a.config, a.set)
    print(f"Plan for {a.config or 'the default config'} (offline: nothing is downloaded, prepared or trained)")
    for line in make_plan(cfg, a.gpus, a.gpu):
        print(line)
    return 0


def eval_cli(a: argparse.Namespace) -> int:
    """`smoltrain eval MODEL ... --data DIR` (loss, bits per byte) or `--tasks T[,T]` (accuracy)."""
    if (a.data is None) == (not a.tasks):
        raise UserError("smoltrain eval needs exactly one of --data DIR (held-out loss and bits per byte) "
                        "or --tasks FILE_OR_NAME (multiple-choice accuracy).")
    for model in a.models:  # every model before any work, and before torch's import (seconds)
        check_model_path(model)
    if a.tasks:
        return _eval_tasks(a)
    return _eval_data(a)


def _eval_data(a: argparse.Namespace) -> int:
    """One row per model: loss, perplexity, bits per byte and tokens on the prepared split."""
    from smoltrain.device import pick_device
    from smoltrain.eval.bpb import evaluate_models

    rows = evaluate_models(a.models, a.data, a.split, a.seq_len, a.batch_size, a.max_tokens, pick_device(a.device))
    if a.json:
        _print_json(rows)
        return 0
    print(f"{'model':<48} {'loss':>8} {'ppl':>10} {'bpb':>7} {'tokens':>10}")
    for r in rows:
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "-"
        print(f"{r['model'][-48:]:<48} {r['loss']:>8.4f} {r['ppl']:>10.2f} {bpb:>7} {r['tokens']:>10,}")
    return 0


def _eval_tasks(a: argparse.Namespace) -> int:
    """Accuracy per model and task, as a table or JSON."""
    from smoltrain.device import pick_device
    from smoltrain.eval.tasks import evaluate_tasks, format_table, parse_task_specs

    rows = evaluate_tasks(a.models, parse_task_specs(a.tasks), a.limit, pick_device(a.device))
    if a.json:
        _print_json(rows)
    else:
        print(format_table(rows))
    return 0


def add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run from a YAML recipe")
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml); defaults apply without one")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="DIR_OR_FILE",
                   help="train on your own texts: these files or folders replace the recipe's datasets (every "
                        "10th document held out; the recipe's BPE, if any, is trained on them; run.dir becomes "
                        "runs/NAME)")
    p.add_argument("--data-ext", type=text_extensions, default=None, metavar="EXT[,EXT]",
                   help="extensions of the files read whole as one document each (data.text_extensions; .txt "
                        "unless given), e.g. .md,.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set train.max_steps=100 (repeatable; "
                        "smoltrain config keys lists them)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit (nothing is checked on disk or written)")
    p.set_defaults(func=train_cli)

    p = sub.add_parser("config", help="the config's keys: types, allowed values and defaults")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = csub.add_parser("keys", help="list every config key with its type, allowed values and default")
    c.add_argument("section", nargs="?", default=None, help="only this section (model, data, optim, ...)")
    c.set_defaults(func=config_keys_cli)


    p = sub.add_parser("plan", help="what a recipe costs before a GPU is rented: tokens, passes, memory, time")
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--gpus", type=POSITIVE, default=1, help="GPUs the run uses (default: 1)")
    p.add_argument("--gpu", default=None, help="one GPU kind (L4, A10G, A100-40GB, A100-80GB, H100, H200; "
                                               "default: all)")
    p.set_defaults(func=plan_cli)

    p = sub.add_parser("eval", help="bits per byte on a prepared split, or accuracy on multiple-choice tasks")
    p.add_argument("models", nargs="+", help="checkpoint, run directory or HF model directory (several: a table)")
    p.add_argument("--data", default=None, help="prepared data directory (smoltrain prepare)")
    p.add_argument("--tasks", action="append", default=[], metavar="FILE_OR_NAME[,...]",
                   help="multiple-choice tasks: JSONL files ({context, choices, label} a line) or lm-eval suite "
                        "names (hellaswag, arc_easy, arc_challenge, piqa, winogrande, openbookqa, commonsense_qa, "
                        "mmlu; need the hub or its cache); comma-separated or repeated")
    p.add_argument("--limit", type=POSITIVE, default=None, help="score only the first N items of each task")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which split of --data to score")
    p.add_argument("--seq-len", type=POSITIVE, default=None,
                   help="window length (default: a training checkpoint's train.seq_len, else the model's context)")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="windows per batch (default: the run's micro batch)")
    p.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="evaluate a fixed sample of about this many tokens spread over the split (default: all)")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=eval_cli)


def report_cli(a: argparse.Namespace) -> int:
    """`smoltrain report RUN --out DIR`: one self-contained HTML page."""
    from smoltrain.app.report import make_report
    from smoltrain.eval.tasks import parse_task_specs

    tasks = parse_task_specs(a.tasks) if a.tasks else ()
    page = make_report(a.run, a.out, a.prompts, a.reference or [], a.data, a.max_new_tokens, a.device,
                       a.max_batches, tasks=tasks, tasks_limit=a.tasks_limit, say=_progress("report"))
    print(f"Wrote {page} (one self-contained file: open it in a browser)")
    return 0


def demo_cli(a: argparse.Namespace) -> int:
    """`smoltrain demo CKPT_OR_RUN`: paths, port and the newest model checked before Gradio starts."""
    from smoltrain.app.demo import CheckpointSource, ModelCache, check_port, serve
    from smoltrain.device import pick_device

    source = CheckpointSource(a.ckpt)
    check_port(a.host, a.port)
    cache = ModelCache(pick_device(a.device), weights=a.weights)
    _, last = source.defaults()
    cache.get(source.path(last))  # a broken checkpoint fails here, not on the first click
    return serve(source, cache, a.host, a.port)


def add_show_commands(sub) -> None:
    p = sub.add_parser("report", help="an HTML report of a run: curves, throughput, samples per checkpoint")
    p.add_argument("run", help="run directory (run.dir of a training run)")
    p.add_argument("--out", required=True, metavar="DIR", type=out_dir,
                   help="directory for index.html (one self-contained page: the charts are embedded)")
    p.add_argument("--prompts", nargs="+", action="extend", default=None, metavar="TEXT",
                   help="prompts to generate at each checkpoint (default: the config's eval.prompts)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=None, help="default: the config's eval.sample_tokens")
    p.add_argument("--reference", nargs="+", action="extend", default=[], metavar="HF_OR_CKPT",
                   help="models to compare with the final checkpoint in a perplexity table (repeatable)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="prepared data for the perplexity table (default with --reference: the run's own)")
    p.add_argument("--max-batches", type=POSITIVE, default=50, help="evaluation batches per model")
    p.add_argument("--tasks", action="append", default=[], metavar="FILE_OR_NAME[,...]",
                   help="multiple-choice tasks for the task table, beside the config's eval.tasks (repeatable)")
    p.add_argument("--tasks-limit", type=POSITIVE, default=None, help="items per task (default: eval.tasks_limit)")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.set_defaults(func=report_cli)

    p = sub.add_parser("demo", help="a local web demo: prompt, sampling controls, checkpoints side by side")
    p.add_argument("ckpt", help="run directory (pick among its checkpoints), checkpoint or HF directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=ranged(domain.interval(1, 65535, high_open=False)), default=7860,
                   help="port to listen on")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--weights", choices=["auto", "fp32", "int8"], default="auto",
                   help="auto (default: int8 on a CPU, fp32 elsewhere), fp32, or int8: weight-only 8-bit "
                        "decoding on the CPU (its quality and speed: BENCHMARKS.md)")
    p.set_defaults(func=demo_cli)


def _progress(command: str):
    """A printer of progress lines on stderr (stdout keeps the result), flushed at once."""
    def say(message: str) -> None:
        print(f"{command}: {message}...", file=sys.stderr, flush=True)

    return say


def _print_json(rows: list[dict]) -> None:
    """One model's row as an object, several as a list."""
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
