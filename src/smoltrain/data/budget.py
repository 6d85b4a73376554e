"""How many tokens a recipe's datasets hold and how many passes its steps make over each.

Exact from a prepared dataset's meta.json; otherwise estimated without reading the data in full (local
files: their text bytes over the tokenizer's bytes per token on a sample; SmolLM-Corpus subsets: the corpus
card's tokens per document) and said so; a hub dataset without such figures is unknown until prepared.
`train` refuses a recipe whose steps would read a dataset more than data.max_epochs times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from smoltrain.config import Config, DatasetConfig
from smoltrain.errors import UserError

DEFAULT_BYTES_PER_TOKEN = 4.0  # English text under a ~50K-token BPE; used only when no tokenizer is at hand
SAMPLE_CHARS = 200_000
# SmolLM-Corpus card (huggingface.co/datasets/HuggingFaceTB/smollm-corpus): (tokens, documents) per subset
CORPUS_CARDS = {
    "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2": (28e9, 39e6),
    "hf:HuggingFaceTB/smollm-corpus:fineweb-edu-dedup": (220e9, 190e6),
    "hf:HuggingFaceTB/smollm-corpus:python-edu": (4e9, 7.68e6),
}


@dataclass(frozen=True)
class Available:
    """A dataset's training tokens: exact (from meta.json), estimated, or None (unknown), and how we know."""

    name: str
    train_tokens: int | None
    exact: bool
    how: str


def _meta_tokens(path: Path) -> int | None:
    try:
        return int(json.loads((path / "meta.json").read_text())["splits"]["train"]["num_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _text_bytes(path: Path, text_key: str) -> tuple[float, int | None]:
    """(text bytes, documents or None) of one local file, from its size or metadata alone."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        col = [i for i in range(md.num_columns) if md.row_group(0).column(i).path_in_schema == text_key]
        size = sum(md.row_group(g).column(col[0]).total_uncompressed_size for g in range(md.num_row_groups)) if col else 0
        return float(size), md.num_rows
    if name.endswith(".gz"):
        with open(path, "rb") as f:  # gzip keeps the uncompressed size (mod 2**32) in its last 4 bytes
            f.seek(-4, 2)
            return float(int.from_bytes(f.read(4), "little")), None
    return float(path.stat().st_size), 1 if name.endswith(".txt") else None


def _bytes_per_token(files: list[Path], text_key: str, tokenizer,
                     extensions: tuple[str, ...]) -> tuple[float, str]:
    if tokenizer is None:
        return DEFAULT_BYTES_PER_TOKEN, f"an assumed {DEFAULT_BYTES_PER_TOKEN} bytes per token (no tokenizer at hand)"
    from smoltrain.data.sources import iter_file

    texts = []
    chars = 0
    for f in files:
        for text in iter_file(f, text_key, extensions):
            texts.append(text[:SAMPLE_CHARS])
            chars += len(texts[-1])
            if chars >= SAMPLE_CHARS:
                break
        if chars >= SAMPLE_CHARS:
            break
    sample = "".join(texts)
    tokens = len(tokenizer.encode(sample)) if sample else 0
    bpt = len(sample.encode()) / tokens if tokens else DEFAULT_BYTES_PER_TOKEN
    return bpt, f"{bpt:.2f} bytes per token measured on a {len(sample.encode()) // 1000} KB sample"


def _estimate_local(cfg: Config, ds: DatasetConfig, sources: list[str], tokenizer) -> Available:
    from smoltrain.data.recipe import text_extensions
    from smoltrain.data.sources import resolve_sources

    extensions = text_extensions(cfg)
    files = [f for src in resolve_sources(sources, extensions) for f in src.files]  # the files prepare reads
    sizes = [_text_bytes(f, cfg.data.text_key) for f in files]
    text = sum(s for s, _ in sizes)
    docs = sum(d for _, d in sizes) if all(d is not None for _, d in sizes) else None
    if cfg.data.max_documents and docs and docs > cfg.data.max_documents:
        text = text * cfg.data.max_documents / docs
        docs = cfg.data.max_documents
    bpt, how = _bytes_per_token(files, cfg.data.text_key, tokenizer, extensions)
    tokens = text / bpt + (docs or 0)
    return Available(ds.name, int(tokens), False, f"estimated: {text / 1e6:,.1f} MB of text at {how}")


def available(cfg: Config, ds: DatasetConfig, tokenizer=None, local_sources: list[str] | None = None) -> Available:
    """The training tokens `ds` holds or will hold once prepared (see the module docstring).

    `local_sources` are its sources resolved to local paths (assets fetched), or None where they are not
    at hand without a download."""
    from smoltrain.data.recipe import dataset_path, token_cap

    path = dataset_path(cfg, ds.name, ds.path)
    exact = _meta_tokens(path)
    if exact is not None:
        return Available(ds.name, exact, True, f"exact, from {path / 'meta.json'}")
    train_share = 1 - ds.held_out_fraction(cfg.data.val_fraction)
    cap = token_cap(cfg, ds)
    est = None
    if local_sources is not None and not any(s.startswith("hf:") for s in local_sources):
        est = _estimate_local(cfg, ds, local_sources, tokenizer)
    elif len(ds.sources) == 1 and ds.sources[0] in CORPUS_CARDS:
        tokens, docs = CORPUS_CARDS[ds.sources[0]]
        n = min(docs, cfg.data.max_documents or docs)
        est = Available(ds.name, int(n * tokens / docs), False,
                        f"estimated from the corpus card: {n:,.0f} documents x {tokens / docs:,.0f} tokens each")
    if est is None:
        if cap is None:
            return Available(ds.name, None, False, "unknown until prepared (a hub dataset: the hub is not asked)")
        return Available(ds.name, int(cap * train_share), False,
                         f"at most its max_tokens cap ({cap:,}); the source's size is unknown until prepared")
    tokens = est.train_tokens if cap is None else min(est.train_tokens, cap)
    capped = f"; capped by max_tokens {cap:,}" if cap is not None and cap < est.train_tokens else ""
    return Available(ds.name, int(tokens * train_share), False, est.how + capped)


def planned_tokens(cfg: Config, global_batch: int) -> dict[str, int]:
    """Training tokens each trained dataset serves over the whole run, by its mixture weight at each step
    (stages included): the loader's expected draw, steps x global batch x seq_len in all."""
    d = cfg.data
    trained = [ds for ds in d.datasets if not ds.eval_only(d.val_fraction)]
    starts = [(0, {ds.name: ds.weight for ds in trained})]
    starts += [(st.start_step, st.weights) for st in d.stages if st.start_step > 0]
    if d.stages and d.stages[0].start_step == 0:
        starts[0] = (0, d.stages[0].weights)
    steps = cfg.train.max_steps
    out = dict.fromkeys((ds.name for ds in trained), 0.0)
    for i, (start, weights) in enumerate(starts):
        end = min(steps, starts[i + 1][0]) if i + 1 < len(starts) else steps
        total = sum(weights.get(n, 0.0) for n in out) or 1.0
        for n in out:
            out[n] += max(0, end - start) * global_batch * cfg.train.seq_len * weights.get(n, 0.0) / total
    return {n: int(v) for n, v in out.items()}


def passes(planned: dict[str, int], avail: dict[str, Available]) -> dict[str, float | None]:
    """Passes over each dataset's training split (None where its size is unknown)."""
    return {n: (t / avail[n].train_tokens if avail[n].train_tokens else None) for n, t in planned.items()}


def check_passes(cfg: Config, global_batch: int, avail: dict[str, Available]) -> None:
    """Refuse a run that would read a dataset more than data.max_epochs times, with the numbers and the ways
    out; only on exact counts (prepared datasets): an estimate is never a reason to refuse."""
    planned = planned_tokens(cfg, global_batch)
    over = []
    for name, p in passes(planned, avail).items():
        a = avail[name]
        if p is None or p <= cfg.data.max_epochs or not a.exact:
            continue
        fit = int(cfg.train.max_steps * cfg.data.max_epochs / p)
        over.append(f"{name}: {planned[name]:,} tokens planned from {a.train_tokens:,} available ({a.how}), "
                    f"{p:.2f} passes (at most {fit:,} steps fit)")
    if over:
        raise UserError(f"This run would read its data more times than data.max_epochs ({cfg.data.max_epochs:g}) "
                        f"allows: {'; '.join(over)}. Ways out: lower train.max_steps; prepare more data (raise "
                        "data.max_tokens or data.max_documents, or add sources); or allow the repeats with "
                        "data.max_epochs: N.")


def budget_line(cfg: Config, global_batch: int, avail: dict[str, Available]) -> str:
    """The start line: tokens planned against tokens available, and the passes that makes, per dataset."""
    planned = planned_tokens(cfg, global_batch)
    parts = []
    for name, p in passes(planned, avail).items():
        have = f"{avail[name].train_tokens:,}" if avail[name].train_tokens is not None else "unknown"
        reads = f", {p:.2f} passes" if p is not None else ""
        parts.append(f"{name} {planned[name]:,} of {have}{reads}")
    return (f"Tokens planned vs available (data.max_epochs {cfg.data.max_epochs:g}): {sum(planned.values()):,} "
            f"({cfg.train.max_steps:,} steps x {global_batch * cfg.train.seq_len:,}); " + "; ".join(parts))
