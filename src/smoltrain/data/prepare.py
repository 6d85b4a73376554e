"""Tokenize documents into token shards plus meta.json, in parallel, atomically.

Each document is encoded without special tokens and followed by one `<|endoftext|>`. The main process reads
documents and writes shards; worker processes (spawned, each with its own tokenizer) encode chunks of about
a megabyte, and results come back in submission order, so the output is identical for any `num_proc`.

Everything is written into a private staging directory next to `out` and published by `storage.publish`
(fsynced, a marker listing the files written last, one rename), so `out` is either complete or absent; an
interrupted run leaves only staging debris, which the next run removes once its process is gone. `--force`
replaces only an earlier prepare output, never a source or a directory with other files. Validation
documents are chosen by name or by position (data/split.py), deterministically; meta.json lists them under
`val_documents` (source-relative names).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from smoltrain.data.shards import META_FORMAT, VERSION, ShardWriter, check_vocab, dtype_for_vocab, load_meta
from smoltrain.data.sources import (
    Document,
    Source,
    count_documents,
    iter_documents,
    iter_named_documents,
    open_datasets,
    resolve_sources,
)
from smoltrain.data.split import Holdout, is_val, raise_unmatched
from smoltrain.data.tokenizer import (
    NoText,
    Tokenizer,
    check_vocab_size,
    load_tokenizer,
    train_bpe,
)
from smoltrain.errors import UserError
from smoltrain.storage import check_inputs, check_target, clean_stale, publish, write_text_synced

CHUNK_CHARS = 1 << 20  # characters per work item: large enough to amortise pickling, small enough to balance
CHUNK_DOCS = 4096
SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard

__all__ = ["is_val", "prepare", "train_tokenizer"]


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, dtype: str, in_pool: bool = True) -> None:
    if in_pool:  # one process per core already: no nested thread pools
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer(Path(tokenizer_dir), tokenizer_dir)
    _WORKER.update(tok=tok, eot=tok.eot_id, dtype=np.dtype(dtype))


def _encode_chunk(texts: list[str], val_flags: list[bool]) -> tuple[np.ndarray, int, np.ndarray, int]:
    """(train tokens, train docs, val tokens, val docs) of one chunk, each document followed by EOT."""
    tok = _WORKER["tok"]
    eot = _WORKER["eot"]
    dtype = _WORKER["dtype"]
    encode = getattr(tok.backend, "encode_batch_fast", tok.backend.encode_batch)  # fast: no offsets
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    out = []
    for want in (False, True):
        parts = [np.asarray(x + [eot], dtype=dtype) for x, v in zip(ids, val_flags) if v == want]
        out += [np.concatenate(parts) if parts else np.zeros(0, dtype), len(parts)]
    return out[0], out[1], out[2], out[3]


def _chunks(docs: Iterator[Document], holdout: Holdout, val_names: list[str],
            seen: list[Document]) -> Iterator[tuple[list[str], list[bool]]]:
    """Work items of about CHUNK_CHARS; records the held-out names, and (for glob checks) every name read."""
    texts = []
    flags = []
    chars = 0
    for i, doc in enumerate(docs):
        held = holdout.is_val(i, doc)
        texts.append(doc.text)
        flags.append(held)
        if held:
            val_names.append(doc.name)
        if holdout.globs:
            seen.append(Document(doc.name, doc.unit, ""))
        chars += len(doc.text)
        if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            yield texts, flags
            texts = []
            flags = []
            chars = 0
    if texts:
        yield texts, flags


def _encode_all(chunks: Iterator, tokenizer_dir: Path, dtype: np.dtype, num_proc: int) -> Iterator:
    """Encoded chunks in order; at most 2 * num_proc chunks in flight, so memory stays flat on huge inputs."""
    initargs = (str(tokenizer_dir), dtype.str)
    if num_proc <= 1:  # in this process; the tokenizers library may still use its own threads
        _init_worker(*initargs, in_pool=False)
        for chunk in chunks:
            yield _encode_chunk(*chunk)
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may hold threads (torch, the tokenizers pool) that fork would break
    with mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=initargs) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, chunk))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _recipe(sources: list[Source], tok: Tokenizer, text_key: str, val_fraction: float, val_docs: int | None,
            max_documents: int | None, val_documents: list[str], max_tokens: int | None = None) -> dict:
    """What determines the output: a re-run with the same recipe is a no-op."""
    specs = [s.spec if s.kind == "hf" else str(Path(s.spec).expanduser().resolve()) for s in sources]
    recipe = {"sources": specs, "tokenizer_sha256": tok.sha256, "text_key": text_key, "val_fraction": val_fraction,
              "val_docs": val_docs, "max_documents": max_documents}
    if val_documents:  # only then: data prepared before names could be held out keeps its recipe
        recipe["val_documents"] = list(val_documents)
    if max_tokens is not None:  # likewise: data prepared before token caps keeps its recipe
        recipe["max_tokens"] = max_tokens
    return recipe


def _existing(out: Path, recipe: dict, force: bool, sources: list[Source]) -> dict | None:
    """The meta of a complete output with the same recipe (nothing to do), else None once it is safe to
    write `out`: never over a source, and over an earlier prepare output only with --force."""
    check_inputs(out, [s.spec for s in sources if s.kind != "hf"])
    if not force and (out / "meta.json").exists():
        meta = load_meta(out)
        differs = [k for k, v in recipe.items() if meta.get("recipe", {}).get(k) != v]
        if not differs:
            return meta
        raise UserError(f"{out} already holds data prepared with a different {', '.join(differs)}; pass --force "
                        "to rebuild it, or choose another --out.")
    check_target(out, "prepare", force)
    return None


def prepare(sources: Iterable[str | Path], tokenizer: str | Path | Tokenizer, out: str | Path, *,
            text_key: str = "text", val_fraction: float = 0.01, val_docs: int | None = None,
            val_documents: Iterable[str] = (), max_documents: int | None = None, max_tokens: int | None = None,
            num_proc: int | None = None, force: bool = False, shard_tokens: int = SHARD_TOKENS,
            model_vocab_size: int | None = None,
            progress: bool = True, verbose: bool = True) -> dict:
    """Tokenize `sources` into `out` and return its meta.json as a dict (see module docstring).

    `val_documents` (globs of source-relative names) holds out those documents and nothing else; without it
    `val_docs` (a count) or `val_fraction` (1.0: an evaluation-only dataset) hold out evenly spaced ones.
    `max_tokens` stops reading once both splits hold that many tokens (see _tokenize).
    """
    t0 = time.perf_counter()
    srcs = resolve_sources(sources)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    eot = tok.eot_id
    globs = tuple(val_documents or ())
    _check_args(tok, val_fraction, val_docs, max_documents, model_vocab_size, globs, max_tokens)
    Holdout(globs).check_files(srcs)
    out = Path(out).expanduser()
    recipe = _recipe(srcs, tok, text_key, val_fraction, val_docs, max_documents, list(globs), max_tokens)
    meta = _existing(out, recipe, force, srcs)
    if meta is not None:
        return _nothing_to_do(out, meta, verbose)
    total = None
    if val_docs is not None:  # an exact count: turn it into the fraction that selects exactly that many
        total = count_documents(srcs, text_key, max_documents)
        val_fraction = _val_docs_fraction(val_docs, total)
    opened = open_datasets(srcs)
    dtype = dtype_for_vocab(max(max(tok.backend.get_vocab().values()), eot))
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, out.name)
    with publish(out, "prepare", hashed=False, replace=force) as staging:
        docs = iter_named_documents(srcs, text_key, max_documents, opened)
        holdout = Holdout(globs, val_fraction)
        val_names = []
        seen = []
        chunks = _chunks(docs, holdout, val_names, seen)
        splits = _tokenize(chunks, tok, staging, dtype, num_proc or _cpu_count(), shard_tokens, progress, total,
                           max_tokens)
        if holdout.unmatched(seen):
            raise_unmatched(holdout.unmatched(seen), [d.name for d in seen])
        meta = {
            "format": META_FORMAT, "version": VERSION,
            "num_tokens": sum(s["num_tokens"] for s in splits.values()),
            "num_documents": sum(s["num_documents"] for s in splits.values()),
            "tokenizer": tok.identity, "vocab_size": tok.vocab_size, "eot_id": eot, "dtype": dtype.name,
            "splits": splits, "sources": [s.spec for s in srcs], "text_key": text_key,
            "val_fraction": None if globs else val_fraction, "val_documents": val_names,
            "val_selection": "names" if globs else "fraction", "max_documents": max_documents, "recipe": recipe,
            "max_tokens": max_tokens,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 3),
        }
        if meta["num_documents"] == 0:
            raise UserError(f"The sources ({', '.join(s.spec for s in srcs)}) yielded no documents.")
        tok.save(staging / "tokenizer")
        write_text_synced(staging / "meta.json", json.dumps(meta, indent=2) + "\n")
    if verbose:
        _report(out, meta)
    return meta


def _nothing_to_do(out: Path, meta: dict, verbose: bool) -> dict:
    if verbose:
        print(f"{out} is already prepared ({meta['num_tokens']:,} tokens, {meta['num_documents']:,} documents)"
              "; nothing to do (--force rebuilds it).")
    return meta


def _check_args(tok: Tokenizer, val_fraction: float, val_docs: int | None, max_documents: int | None,
                model_vocab_size: int | None, globs: tuple[str, ...], max_tokens: int | None = None) -> None:
    if model_vocab_size is not None:
        check_vocab(tok, model_vocab_size)
    if not 0 <= val_fraction <= 1:
        raise UserError(f"--val-fraction must be in [0, 1] (1 holds out everything: an evaluation-only "
                        f"dataset), got {val_fraction}.")
    if globs and val_docs is not None:
        raise UserError("--val-documents and --val-docs both choose the held-out documents; give one.")
    if any(not isinstance(g, str) or not g for g in globs):
        raise UserError(f"--val-documents takes non-empty glob strings, got {list(globs)}.")
    if val_docs is not None and val_docs < 0:
        raise UserError(f"--val-docs must not be negative, got {val_docs}.")
    if max_documents is not None and max_documents < 1:
        raise UserError(f"--max-documents must be at least 1, got {max_documents}.")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}.")


def _val_docs_fraction(val_docs: int, total: int | None) -> float:
    if total is None:
        raise UserError("--val-docs needs the number of documents up front, which a streamed hf: source "
                        "does not tell; pass --max-documents too, or use --val-fraction.")
    if val_docs >= max(total, 1):
        raise UserError(f"--val-docs {val_docs} must be below the number of documents ({total}).")
    return val_docs / total if total else 0.0


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _tokenize(chunks: Iterator, tok: Tokenizer, staging: Path, dtype: np.dtype, num_proc: int,
              shard_tokens: int, progress: bool, total: int | None, max_tokens: int | None = None) -> dict:
    """Encode and write every work item; with `max_tokens`, stop after the first item (about a megabyte of text)
    that brings both splits to at least that many, so the same documents are kept for any num_proc."""
    from tqdm.auto import tqdm

    writers = {name: ShardWriter(staging, name, dtype, shard_tokens) for name in ("train", "val")}
    bar = tqdm(total=total, unit="doc", desc="prepare", disable=not progress, dynamic_ncols=True, mininterval=0.5)
    num_tokens = 0
    try:
        for train, n_train, val, n_val in _encode_all(chunks, tok.directory, dtype, num_proc):
            writers["train"].write(train, n_train)
            writers["val"].write(val, n_val)
            num_tokens += len(train) + len(val)
            bar.update(n_train + n_val)
            bar.set_postfix_str(f"{num_tokens:,} tokens", refresh=False)
            if max_tokens is not None and num_tokens >= max_tokens:
                break  # closing the generator stops the workers; the documents after this item are not read
    finally:
        bar.close()
    splits = {}
    for name, w in writers.items():
        shards = w.close()
        splits[name] = {"num_tokens": sum(s["num_tokens"] for s in shards),
                        "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    return splits


def _report(out: Path, meta: dict) -> None:
    tr = meta["splits"]["train"]
    va = meta["splits"]["val"]
    rate = meta["num_tokens"] / max(meta["seconds"], 1e-9)
    print(f"Prepared {out}: {meta['num_tokens']:,} tokens from {meta['num_documents']:,} documents "
          f"(train {tr['num_tokens']:,} tokens / {tr['num_documents']:,} docs, val {va['num_tokens']:,} / "
          f"{va['num_documents']:,}) in {meta['seconds']:.1f}s, {rate:,.0f} tokens/s.")
    if meta["val_selection"] == "names":
        shown = ", ".join(meta["val_documents"][:6]) + (", ..." if len(meta["val_documents"]) > 6 else "")
        print(f"Held out by name: {shown}.")
    if not tr["num_documents"] and meta["val_fraction"] != 1:
        print("Warning: the train split is empty (every document went to validation); lower --val-fraction.")
    if not va["num_documents"] and (meta["val_fraction"] or 0) > 0:
        print(f"Note: no validation documents ({meta['num_documents']} documents x val fraction "
              f"{meta['val_fraction']} rounds to 0); use --val-docs N to hold some out.")


def train_tokenizer(sources, vocab_size: int, out_dir: str | Path, *, text_key: str = "text",
                    max_documents: int | None = None, min_frequency: int = 2,
                    extra_special_tokens: list[str] | tuple[str, ...] = (), force: bool = False,
                    show_progress: bool = False) -> Tokenizer:
    """`tokenizer.train_bpe` on the documents of raw sources (files, dirs, hf:NAME), saved to `out_dir`.

    Here, not in tokenizer.py, because reading sources is the data layer's job and the tokenizer sits below
    it; the sources are checked as inputs (never replaced by --force) before any training.
    """
    check_vocab_size(vocab_size, extra_special_tokens)
    out = Path(out_dir).expanduser()
    srcs = resolve_sources(sources)
    check_target(out, "tokenizer", force, inputs=[s.spec for s in srcs if s.kind != "hf"])
    try:
        return train_bpe(iter_documents(srcs, text_key, max_documents), vocab_size, out, min_frequency=min_frequency,
                         extra_special_tokens=extra_special_tokens, show_progress=show_progress, force=force)
    except NoText:
        raise UserError(f"The sources ({', '.join(s.spec for s in srcs)}) hold no text to train a tokenizer "
                        "on.") from None
