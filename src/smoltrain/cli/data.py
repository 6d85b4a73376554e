"""Commands on data: prepare, tokenizer train, tasks next-line."""

from __future__ import annotations

import argparse

from smoltrain import domain
from smoltrain.cli.args import POSITIVE, out_dir, out_file, ranged


def _cmd_prepare(a: argparse.Namespace) -> int:
    from smoltrain.data.prepare import prepare

    prepare(a.source, a.tokenizer, a.out, text_key=a.text_key, val_fraction=a.val_fraction, val_docs=a.val_docs,
            val_documents=a.val_documents, max_documents=a.max_documents, max_tokens=a.max_tokens,
            num_proc=a.num_proc, force=a.force, shard_tokens=a.shard_tokens, model_vocab_size=a.model_vocab_size,
            progress=not a.no_progress)
    return 0


def _cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from smoltrain.data.prepare import train_tokenizer

    tok = train_tokenizer(a.source, a.vocab_size, a.out, text_key=a.text_key, max_documents=a.max_documents,
                          min_frequency=a.min_frequency, extra_special_tokens=a.special_token, force=a.force,
                          show_progress=True)
    print(f"Trained a byte-level BPE with {tok.vocab_size} tokens -> {a.out} (<|endoftext|> is id {tok.eot_id})")
    return 0


def next_line_cli(a: argparse.Namespace) -> int:
    """`smoltrain tasks next-line --data DIR --out FILE`."""
    from smoltrain.eval.nextline import make_next_line_task

    out = make_next_line_task(a.data, a.out, a.items, a.seed, a.context_lines, force=a.force)
    n = sum(1 for _ in open(out, encoding="utf-8"))
    print(f"Wrote {n} next-line items from the held-out documents of {a.data} -> {out}")
    return 0


def add_tasks_command(sub) -> None:
    p = sub.add_parser("tasks", help="build multiple-choice task files for smoltrain eval --tasks")
    tsub = p.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    t = tsub.add_parser("next-line", help="pick the true next line among four, from a prepared dataset's held-out split")
    t.add_argument("--data", required=True, metavar="DIR", help="prepared data directory (its val split is used)")
    t.add_argument("--out", required=True, metavar="FILE", type=out_file, help="JSONL task file to write")
    t.add_argument("--items", type=POSITIVE, default=500, help="number of items (default 500)")
    t.add_argument("--context-lines", type=POSITIVE, default=4, help="lines of context before the line to pick")
    t.add_argument("--seed", type=ranged(domain.seed), default=0, help="seed for the distractors and answer positions")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.set_defaults(func=next_line_cli)


def add_data_commands(sub) -> None:
    src_help = "a .txt/.jsonl/.jsonl.gz/.parquet file, a directory of them, or hf:NAME[:CONFIG[:SPLIT]] (repeatable)"
    p = sub.add_parser("prepare", help="tokenize documents into token shards + meta.json for training")
    p.add_argument("--source", action="append", required=True, metavar="SRC", help=src_help)
    p.add_argument("--tokenizer", required=True, metavar="TOK", help="hub id, directory, tokenizer.json or .gguf")
    p.add_argument("--out", required=True, metavar="DIR", type=out_dir,
                   help="output directory (appears only when complete)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=ranged(domain.probability, float), default=0.01,
                     help="fraction of documents held out for validation, evenly spaced (default 0.01; 1: all, "
                          "an evaluation-only dataset)")
    val.add_argument("--val-docs", type=ranged(domain.nonneg()), default=None,
                     help="hold out exactly this many documents instead")
    val.add_argument("--val-documents", action="append", default=[], metavar="GLOB",
                     help="hold out the documents whose source-relative name (e.g. hamlet_gut.txt, rows.jsonl#3) or "
                          "file matches GLOB, and only those (repeatable)")
    p.add_argument("--text-key", default="text", help="text column of jsonl/parquet/hf rows (default text)")
    p.add_argument("--max-documents", type=POSITIVE, default=None, help="stop after this many documents in all")
    p.add_argument("--max-tokens", type=POSITIVE, default=None,
                   help="stop once this many tokens are prepared (at the next ~1 MB work item)")
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
    t.add_argument("--out", required=True, metavar="DIR", type=out_dir,
                   help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--text-key", default="text")
    t.add_argument("--max-documents", type=POSITIVE, default=None)
    t.add_argument("--min-frequency", type=POSITIVE, default=2, help="merges must occur at least this often")
    t.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="extra special token after <|endoftext|>, <|im_start|>, <|im_end|> (repeatable)")
    t.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    t.set_defaults(func=_cmd_tokenizer_train)
