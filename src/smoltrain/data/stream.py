"""Train straight from streamed sources: tokenized ahead of the step in worker processes, mixed, packed.

Each streamed dataset's documents (a `datasets.IterableDataset`: an hf: dataset, or local files read
through `datasets`) are cut, as they are read, into *chunks* of about `chunk_chars` characters. A chunk is
encoded (no special tokens, one `<|endoftext|>` after each document) by one of `num_workers` background
processes of a torch DataLoader: every worker reads the whole stream (cheap next to encoding) and encodes
only the chunks numbered w, w + N, w + 2N, ...; the DataLoader hands them back round-robin, that is in
chunk order. So a dataset's token stream, and every batch, is the same for 0 (in-process), 1 or 8 workers.

Packing and mixing follow `PackedLoader`: windows of T+1 tokens with stride T cut from each dataset's
token stream in order, and the row -> dataset choice of each global batch drawn by `loader.Mixture` from
(seed, step). With several ranks, `datasets.distributed.split_dataset_by_node` gives each rank its own
documents and each rank reads its own rows of the global batch.

Resuming is exact and cheap: the state holds, per dataset, the first chunk not fully served (its epoch,
number, and the stream's `state_dict()` where it starts) and how many of its tokens were served; the
workers restart there, re-encode that one chunk and skip the served tokens. It is a few hundred bytes of
JSON, and does not depend on the number of workers, which may change between runs. Documents come in
stored order: no shuffle buffer (its contents could not be restored exactly).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from smoltrain.data.loader import Mixture, named_datasets
from smoltrain.data.sources import file_kind, open_hf, resolve_source
from smoltrain.data.tokenizer import Tokenizer, load_tokenizer
from smoltrain.errors import UserError

_BUILDERS = {".txt": ("text", {"sample_by": "document", "encoding_errors": "replace"}),
             ".jsonl": ("json", {}), ".jsonl.gz": ("json", {}), ".parquet": ("parquet", {})}
CHUNK_CHARS = 1 << 18  # ~60K SmolLM2 tokens: one unit of work for a worker, re-encoded once on resume


def open_stream(spec: str | Path):
    """An IterableDataset for a source spec: hf:NAME[:CONFIG[:SPLIT]], a file, or a directory of one format."""
    src = resolve_source(spec)
    if src.kind == "hf":
        return open_hf(src.name, src.config, src.split, streaming=True)
    kinds = {_BUILDERS[file_kind(f)][0] for f in src.files}
    if len(kinds) > 1:
        raise UserError(f"Streaming source {spec} mixes file formats ({', '.join(sorted(kinds))}); stream one "
                        "format per source, or use smoltrain prepare, which reads any mix.")
    import datasets

    builder, kwargs = _BUILDERS[file_kind(src.files[0])]
    return datasets.load_dataset(builder, data_files=[str(f) for f in src.files], split="train", streaming=True,
                                 **kwargs)


def _text(row: Mapping, text_key: str, source: str) -> str:
    if text_key not in row:
        raise UserError(f"Stream {source} has no {text_key!r} column (columns: {', '.join(row)}); choose one "
                        "with data.text_key.")
    return row[text_key] or ""


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def die_with_parent() -> None:
    """In a worker: exit as soon as the trainer is gone. Killed with -9, the trainer leaves its workers
    blocked for ever flushing encoded chunks into a pipe nobody reads (torch's own watchdog never gets to
    run), holding the trainer's stdout open; a thread watching the parent's pid ends them instead."""
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _as_is(item: dict) -> dict:
    """The DataLoader's collate: chunks come back as the workers made them."""
    return item


class ChunkStream(IterableDataset):
    """One dataset's documents on one rank as encoded chunks, forever (epoch after epoch), from `start`:
    (epoch, chunk number, the stream's state_dict() where that chunk starts, or None for an epoch's start)."""

    def __init__(self, source: str, tokenizer_dir: Path, text_key: str, rank: int, world_size: int,
                 chunk_chars: int, start: tuple[int, int, dict | None]):
        self.source = source
        self.tokenizer_dir = str(tokenizer_dir)
        self.text_key = text_key
        self.rank = rank
        self.world_size = world_size
        self.chunk_chars = chunk_chars
        self.start = start

    def open(self, epoch: int, position: Mapping | None):
        ds = open_stream(self.source)
        if self.world_size > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds = ds.with_format("arrow")  # columnar batches: cheap to read whole (see batches)
        ds.set_epoch(epoch)
        if position is not None:
            ds.load_state_dict(position)
        return ds

    def batches(self, ds) -> Iterator[list[str]]:
        """The texts, read as arrow batches: columnar (cheap to read whole), and not `iter(ds)`, which in a
        DataLoader worker hands each worker only some of the files."""
        rows = max(1, min(256, self.chunk_chars // 4096))
        for table in ds.iter(batch_size=rows):
            if self.text_key not in table.column_names:
                _text(dict.fromkeys(table.column_names), self.text_key, self.source)
            yield [t or "" for t in table.column(self.text_key).to_pylist()]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num, me = (1, 0) if info is None else (info.num_workers, info.id)
        if info is not None:  # one process per core already: no nested thread pool
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            die_with_parent()
        tok = Tokenizer(Path(self.tokenizer_dir), self.tokenizer_dir)
        epoch, number, position = self.start
        seq = 0  # chunks since this stream started: chunk seq is worker seq % num's
        while True:
            ds = self.open(epoch, position)
            texts = []
            chars = 0
            docs = 0
            begin = position
            for batch in self.batches(ds):
                if seq % num == me:
                    texts += batch
                chars += sum(map(len, batch))
                docs += len(batch)
                if chars >= self.chunk_chars:
                    if seq % num == me:
                        yield self.encode(tok, texts, epoch, number, begin)
                    seq += 1
                    number += 1
                    begin = ds.state_dict() if seq % num == me else None
                    texts = []
                    chars = 0
                    docs = 0
            if docs and seq % num == me:
                yield self.encode(tok, texts, epoch, number, begin)
            seq += 1 if docs else 0
            if position is None and not number and not docs:
                raise UserError(f"Stream {self.source} yields no documents (rank {self.rank} of {self.world_size}).")
            epoch += 1
            number = 0
            position = None

    def encode(self, tok: Tokenizer, texts: list[str], epoch: int, number: int, begin: dict | None) -> dict:
        ids = [np.asarray(doc + [tok.eot_id], dtype=np.int32) for doc in tok.encode_batch(texts)]
        return {"ids": np.concatenate(ids), "epoch": epoch, "number": number, "begin": begin}


class Feed:
    """One dataset's token stream on this rank: chunks pulled from its workers as windows are taken, and
    the position (first chunk not fully served, tokens of it served) that resumes it exactly."""

    def __init__(self, name: str, stream: ChunkStream, num_workers: int, seq_len: int):
        self.name = name
        self.stream = stream
        self.num_workers = num_workers
        self.seq_len = seq_len
        self.tokens = 0
        self.restart(stream.start, 0)

    def restart(self, start: tuple[int, int, dict | None], offset: int) -> None:
        self.stream.start = start
        self.skip = offset  # tokens of the first chunk already served
        self.chunks: deque = deque()  # (epoch, number, begin, length) of the chunks in `buffer`
        self.buffer = np.zeros(0, np.int32)
        self.offset = 0
        self.it: Iterator | None = None

    def _pull(self) -> None:
        if self.it is None:
            context = "spawn" if self.num_workers else None  # the trainer holds threads that fork would break
            self.it = iter(DataLoader(self.stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                                      multiprocessing_context=context))
        try:
            chunk = next(self.it)
        except UserError as e:  # raised in a worker: keep the message, drop the worker's traceback
            raise UserError(str(e).strip().splitlines()[-1].removeprefix("smoltrain.errors.UserError: ")) from None
        self.chunks.append((chunk["epoch"], chunk["number"], chunk["begin"], len(chunk["ids"])))
        self.buffer = np.concatenate([self.buffer, chunk["ids"]])
        if self.skip:
            self.buffer = self.buffer[self.skip:]
            self.offset = self.skip
            self.skip = 0

    def take(self, out: np.ndarray) -> None:
        """Fill the (n, T+1) array `out` with the next n windows (stride T) of this dataset's stream."""
        t = self.seq_len
        for row in out:
            while len(self.buffer) < t + 1:
                self._pull()
            row[:] = self.buffer[:t + 1]
            self.buffer = self.buffer[t:]  # the last label is the next window's first input
            self.offset += t
            while self.offset >= self.chunks[0][3] and len(self.chunks) > 1:
                self.offset -= self.chunks.popleft()[3]
        self.tokens += len(out) * t

    def state_dict(self) -> dict:
        if self.chunks:
            epoch, number, begin, _ = self.chunks[0]
            return {"epoch": epoch, "chunk": number, "begin": begin, "offset": self.offset, "tokens": self.tokens}
        epoch, number, begin = self.stream.start
        return {"epoch": epoch, "chunk": number, "begin": begin, "offset": self.skip, "tokens": self.tokens}

    def load_state_dict(self, state: Mapping) -> None:
        self.restart((int(state["epoch"]), int(state["chunk"]), state["begin"]), int(state["offset"]))
        self.tokens = int(state["tokens"])


def check_stream(source: str, text_key: str) -> None:
    """Refuse a stream without documents or without the text column before any worker starts."""
    row = next(iter(open_stream(source)), None)
    if row is None:
        raise UserError(f"Stream {source} yields no documents.")
    _text(row, text_key, source)


class StreamLoader:
    """Same API as PackedLoader (next_batch, state_dict, load_state_dict, tokens_per_source) over streams.

    `datasets` maps names to source specs (one source each: an hf: id, a file, or a directory of many
    files); `weights` and `stages` mix them as PackedLoader does; `num_workers` processes encode each
    dataset's chunks ahead of the step (0: in this process, between steps).
    """

    def __init__(self, datasets: Mapping[str, str | Path] | str | Path | list, tokenizer: str | Path | Tokenizer,
                 batch_size: int, seq_len: int, text_key: str = "text", rank: int = 0, world_size: int = 1,
                 seed: int = 0, weights: Mapping[str, float] | None = None, stages: list | None = None,
                 grad_accum_steps: int = 1, num_workers: int = 0, chunk_chars: int = CHUNK_CHARS):
        if min(batch_size, seq_len, world_size, grad_accum_steps, chunk_chars) < 1 or not 0 <= rank < world_size \
                or num_workers < 0:
            raise UserError(f"Bad loader shape: batch_size {batch_size}, seq_len {seq_len}, rank {rank}, "
                            f"world_size {world_size}, grad_accum_steps {grad_accum_steps}, "
                            f"num_workers {num_workers}, chunk_chars {chunk_chars}.")
        named = {n: str(s) for n, s in named_datasets(datasets).items()}
        if not named:
            raise UserError("No datasets given to the stream loader.")
        self.sources = named
        self.names = list(named)
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        self.eot_id = self.tok.eot_id
        self.vocab_size = self.tok.vocab_size
        self.tokenizer_identity = self.tok.identity
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.grad_accum_steps = grad_accum_steps
        self.num_workers = num_workers
        self.mixture = Mixture(self.names, weights, stages, seed)
        for source in named.values():
            check_stream(source, text_key)
        self.feeds = [Feed(n, ChunkStream(s, self.tok.directory, text_key, rank, world_size, chunk_chars,
                                          (0, 0, None)), num_workers, seq_len) for n, s in named.items()]
        self._step = 0
        self._micro = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum_steps

    def next_batch(self) -> torch.Tensor:
        """This rank's next micro-batch: a (batch_size, seq_len + 1) int64 tensor."""
        b = self.batch_size
        lo = (self._micro * self.world_size + self.rank) * b
        src = self.mixture.draw(self._step, self.global_batch)[lo:lo + b]
        out = np.empty((b, self.seq_len + 1), dtype=np.int64)
        for k, feed in enumerate(self.feeds):
            rows = np.flatnonzero(src == k)
            if len(rows):
                part = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
                feed.take(part)
                out[rows] = part
        self._micro += 1
        if self._micro == self.grad_accum_steps:
            self._step += 1
            self._micro = 0
        return torch.from_numpy(out)

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Label tokens this rank has served per dataset (streams are split by document, so ranks differ)."""
        return {f.name: f.tokens for f in self.feeds}

    def state_dict(self) -> dict:
        return {"version": 2, "kind": "stream", "step": self._step, "micro_step": self._micro,
                "sources": self.sources, "seq_len": self.seq_len, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "global_batch": self.global_batch,
                "feeds": {f.name: f.state_dict() for f in self.feeds}}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: every dataset's workers restart at its first unserved chunk, skipping what was served."""
        if state.get("version") != 2:
            raise UserError("The saved stream state comes from an older smoltrain (one source, no workers); "
                            "resume it with that version, or start a new run.")
        mine = {"sources": self.sources, "seq_len": self.seq_len, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}
        differs = [k for k, v in mine.items() if state.get(k) != v]
        if state.get("micro_step", 0) and state.get("global_batch") != self.global_batch:
            differs.append("global_batch (mid-step)")
        if differs:
            raise UserError(f"The saved stream state does not fit this loader: {', '.join(differs)} changed.")
        self._step = int(state["step"])
        self._micro = int(state["micro_step"])
        for feed in self.feeds:
            feed.load_state_dict(state["feeds"][feed.name])
