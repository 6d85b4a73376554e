"""The `smoltrain` command: argument parsing and dispatch only; the work lives in the modules."""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smoltrain import domain
from smoltrain.domain import Domain
from smoltrain.errors import TrainingError, UserError


def _arg(dom: Domain, parse: type = int) -> Callable[[str], Any]:
    """An argparse type that parses and then refuses values outside `dom`, so argparse exits 2 naming
    the option before any work; floats must also be finite."""
    def convert(raw: str) -> Any:
        try:
            value = parse(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {parse.__name__}, got {raw!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {raw})")
        if not dom.ok(value):
            raise argparse.ArgumentTypeError(f"must be {dom.text} (got {raw})")
        return value

    return convert


POSITIVE = _arg(domain.positive)
DEVICE = _arg(domain.device, str)


def _out_dir(raw: str) -> str:
    """An output directory: it may not exist yet, but nothing on its path may be a file."""
    path = Path(raw).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"lies under {p}, which is a file"
            raise argparse.ArgumentTypeError(f"{raw} {what}, not a directory")
    return raw


def _out_file(raw: str) -> str:
    """An output file: not a directory, and no file among the directories above it."""
    path = Path(raw).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{raw} is a directory, not a file")
    _out_dir(str(path.parent))
    return raw


def _cmd_assets(a: argparse.Namespace) -> int:
    from smoltrain.assets import fetch_assets

    paths = fetch_assets(a.dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_import(a: argparse.Namespace) -> int:
    from smoltrain.interop import import_model

    out = import_model(a.src, a.out, tokenizer=a.tokenizer, force=a.force)
    print(f"Imported {a.src} -> {out}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from smoltrain.interop import export_hf

    if a.push_to_hub:
        from smoltrain.hub import check_token, push_folder

        check_token(a.push_to_hub)  # before any work
    elif a.out is None:
        raise UserError("export needs --out DIR (or --push-to-hub REPO_ID).")
    if a.out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="smoltrain-export-") as tmp:
            out = export_hf(a.ckpt, f"{tmp}/export")
            url = push_folder(out, a.push_to_hub, a.revision, a.private, f"smoltrain export of {a.ckpt}")
    else:
        out = export_hf(a.ckpt, a.out, force=a.force)
        print(f"Exported {a.ckpt} -> {out} (loads with transformers AutoModelForCausalLM / AutoTokenizer)")
        if a.push_to_hub:
            url = push_folder(out, a.push_to_hub, a.revision, a.private, f"smoltrain export of {a.ckpt}")
    if a.push_to_hub:
        print(f"Pushed {a.ckpt} to {a.push_to_hub} (revision {a.revision or 'main'}): {url}")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from smoltrain.generate import generate_cli

    return generate_cli(a)


def _cmd_train(a: argparse.Namespace) -> int:
    from smoltrain.trainer import train_cli

    return train_cli(a)


def _cmd_eval(a: argparse.Namespace) -> int:
    from smoltrain.evaluate import eval_cli
    from smoltrain.tasks import tasks_cli

    if (a.data is None) == (not a.tasks):
        raise UserError("smoltrain eval needs exactly one of --data DIR (held-out loss and bits per byte) "
                        "or --tasks FILE_OR_NAME (multiple-choice accuracy).")
    return tasks_cli(a) if a.tasks else eval_cli(a)


def _add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run from a YAML recipe")
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml); defaults apply without one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set train.max_steps=100 (repeatable)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="bits per byte on a prepared split, or accuracy on multiple-choice tasks")
    p.add_argument("models", nargs="+", help="checkpoint, run directory or HF model directory (several: a table)")
    p.add_argument("--data", default=None, help="prepared data directory (smoltrain prepare)")
    p.add_argument("--tasks", action="append", default=[], metavar="FILE_OR_NAME[,...]",
                   help="multiple-choice tasks: JSONL files ({context, choices, label} a line) or lm-eval suite "
                        "names (hellaswag, arc_easy, arc_challenge, piqa, winogrande, openbookqa, commonsense_qa, "
                        "mmlu; need the hub or its cache); comma-separated or repeated")
    p.add_argument("--limit", type=POSITIVE, default=None, help="score only the first N items of each task")
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--seq-len", type=POSITIVE, default=None,
                   help="window length (default: a training checkpoint's train.seq_len, else the model's context)")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="windows per batch (default: the run's micro batch)")
    p.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="evaluate a fixed sample of about this many tokens spread over the split (default: all)")
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_eval)


def _add_model_commands(sub) -> None:
    p = sub.add_parser("assets", help="fetch the offline reference assets (SmolLM2-135M-Instruct GGUF, Shakespeare)")
    p.add_argument("--dir", default=None, help="cache directory (default ~/.cache/smoltrain/assets)")
    p.set_defaults(func=_cmd_assets)

    p = sub.add_parser("import", help="import an HF model directory or a .gguf file as a smoltrain checkpoint")
    p.add_argument("src", help="HF model directory (safetensors or .bin) or a .gguf file")
    p.add_argument("--out", required=True, type=_out_dir, help="checkpoint directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer to keep with it (default: the source's own)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("export", help="export a checkpoint (or a run's newest) as an HF directory")
    p.add_argument("ckpt", help="checkpoint directory or run directory")
    p.add_argument("--out", default=None, type=_out_dir, help="HF directory to write (optional with --push-to-hub)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the export to this Hub model repo (HF_TOKEN, HF_ENDPOINT honoured)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="with --push-to-hub: branch (default main)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("ckpt", help="checkpoint directory, run directory or HF directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a file with one prompt per line (generated as a batch)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=100)
    p.add_argument("--temperature", type=_arg(domain.temperature, float), default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=_arg(domain.nonneg("off")), default=0, help="0 disables")
    p.add_argument("--top-p", type=_arg(domain.top_p, float), default=1.0, help="1.0 disables")
    p.add_argument("--repetition-penalty", type=_arg(domain.positive, float), default=1.0,
                   help="1.0 disables (HF semantics)")
    p.add_argument("--seed", type=_arg(domain.seed), default=None)
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--no-stream", action="store_true", help="print when done instead of token by token")
    p.set_defaults(func=_cmd_generate)


# --- data commands (prepare, tokenizer) ---
def _cmd_prepare(a: argparse.Namespace) -> int:
    from smoltrain.data.prepare import prepare

    prepare(a.source, a.tokenizer, a.out, text_key=a.text_key, val_fraction=a.val_fraction, val_docs=a.val_docs,
            val_documents=a.val_documents, max_documents=a.max_documents, num_proc=a.num_proc, force=a.force, shard_tokens=a.shard_tokens,
            model_vocab_size=a.model_vocab_size, progress=not a.no_progress)
    return 0


def _cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from smoltrain.data.prepare import train_tokenizer

    tok = train_tokenizer(a.source, a.vocab_size, a.out, text_key=a.text_key, max_documents=a.max_documents,
                          min_frequency=a.min_frequency, extra_special_tokens=a.special_token, force=a.force,
                          show_progress=True)
    print(f"Trained a byte-level BPE with {tok.vocab_size} tokens -> {a.out} (<|endoftext|> is id {tok.eot_id})")
    return 0


def _cmd_tasks_next_line(a: argparse.Namespace) -> int:
    from smoltrain.nextline import next_line_cli

    return next_line_cli(a)


def _add_tasks_command(sub) -> None:
    p = sub.add_parser("tasks", help="build multiple-choice task files for smoltrain eval --tasks")
    tsub = p.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    t = tsub.add_parser("next-line", help="pick the true next line among four, from a prepared dataset's held-out split")
    t.add_argument("--data", required=True, metavar="DIR", help="prepared data directory (its val split is used)")
    t.add_argument("--out", required=True, metavar="FILE", type=_out_file, help="JSONL task file to write")
    t.add_argument("--items", type=POSITIVE, default=500, help="number of items (default 500)")
    t.add_argument("--context-lines", type=POSITIVE, default=4, help="lines of context before the line to pick")
    t.add_argument("--seed", type=_arg(domain.seed), default=0, help="seed for the distractors and answer positions")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.set_defaults(func=_cmd_tasks_next_line)


def _add_data_commands(sub) -> None:
    src_help = "a .txt/.jsonl/.jsonl.gz/.parquet file, a directory of them, or hf:NAME[:CONFIG[:SPLIT]] (repeatable)"
    p = sub.add_parser("prepare", help="tokenize documents into token shards + meta.json for training")
    p.add_argument("--source", action="append", required=True, metavar="SRC", help=src_help)
    p.add_argument("--tokenizer", required=True, metavar="TOK", help="hub id, directory, tokenizer.json or .gguf")
    p.add_argument("--out", required=True, metavar="DIR", type=_out_dir,
                   help="output directory (appears only when complete)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=_arg(domain.probability, float), default=0.01,
                     help="fraction of documents held out for validation, evenly spaced (default 0.01; 1: all, "
                          "an evaluation-only dataset)")
    val.add_argument("--val-docs", type=_arg(domain.nonneg()), default=None,
                     help="hold out exactly this many documents instead")
    val.add_argument("--val-documents", action="append", default=[], metavar="GLOB",
                     help="hold out the documents whose source-relative name (e.g. hamlet_gut.txt, rows.jsonl#3) or "
                          "file matches GLOB, and only those (repeatable)")
    p.add_argument("--text-key", default="text", help="text column of jsonl/parquet/hf rows (default text)")
    p.add_argument("--max-documents", type=POSITIVE, default=None, help="stop after this many documents in all")
    p.add_argument("--num-proc", type=POSITIVE, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=POSITIVE, default=100_000_000, help="tokens per shard file")
    p.add_argument("--model-vocab-size", type=POSITIVE, default=None,
                   help="fail early if the tokenizer has more tokens than the model's vocab_size")
    p.add_argument("--force", action="store_true", help="rebuild an existing --out (replaced only once done)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE (SmolLM2 style) on your documents")
    t.add_argument("--source", action="append", required=True, metavar="SRC", help=src_help)
    t.add_argument("--vocab-size", type=POSITIVE, required=True, help="total tokens, special tokens included")
    t.add_argument("--out", required=True, metavar="DIR", type=_out_dir,
                   help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--text-key", default="text")
    t.add_argument("--max-documents", type=POSITIVE, default=None)
    t.add_argument("--min-frequency", type=POSITIVE, default=2, help="merges must occur at least this often")
    t.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="extra special token after <|endoftext|>, <|im_start|>, <|im_end|> (repeatable)")
    t.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    t.set_defaults(func=_cmd_tokenizer_train)
# --- end data commands ---


# --- show commands (report, demo) ---
def _cmd_report(a: argparse.Namespace) -> int:
    from smoltrain.report import report_cli

    return report_cli(a)


def _cmd_demo(a: argparse.Namespace) -> int:
    from smoltrain.demo import demo_cli

    return demo_cli(a)


def _add_show_commands(sub) -> None:
    p = sub.add_parser("report", help="an HTML report of a run: curves, throughput, samples per checkpoint")
    p.add_argument("run", help="run directory (run.dir of a training run)")
    p.add_argument("--out", required=True, metavar="DIR", type=_out_dir,
                   help="directory for index.html and its PNG images")
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
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="a local web demo: prompt, sampling controls, checkpoints side by side")
    p.add_argument("ckpt", help="run directory (pick among its checkpoints), checkpoint or HF directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_arg(domain.interval(1, 65535, high_open=False)), default=7860)
    p.add_argument("--device", default="auto", type=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.set_defaults(func=_cmd_demo)
# --- end show commands ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoltrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_commands(sub)
    _add_data_commands(sub)
    _add_tasks_command(sub)
    _add_train_commands(sub)
    _add_show_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"smoltrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"smoltrain {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:
        from smoltrain.storage import is_no_space

        if is_no_space(e):  # a full disk is not a bug: one message; the partial output was already removed
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            print(f"smoltrain {args.command}: stopped: no space left on device{where}. What was being written was "
                  "removed and earlier outputs (checkpoints included) are intact; free some space and run the "
                  "same command again.", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"smoltrain {args.command}: internal error (a bug: please report it with the traceback above)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
