"""Train straight from a streamed source: tokenize and pack on the fly, no prepare step.

The documents come from a `datasets.IterableDataset` (an hf: dataset, or local files read through
`datasets`), are encoded without special tokens and followed by `<|endoftext|>`, and are packed into the same
(B, T+1) windows as `PackedLoader` (stride T). Resuming restores the stream's own position
(`IterableDataset.state_dict()`) plus the tokens already read but not yet served; nothing is re-read and
skipped. Documents come in stored order (no shuffle buffer: its contents could not be restored exactly).
With several ranks, `datasets.distributed.split_dataset_by_node` gives each rank its own documents.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from smoltrain.data.sources import file_kind, open_hf, resolve_source
from smoltrain.data.tokenizer import Tokenizer, load_tokenizer
from smoltrain.errors import UserError

_BUILDERS = {".txt": ("text", {"sample_by": "document", "encoding_errors": "replace"}),
             ".jsonl": ("json", {}), ".jsonl.gz": ("json", {}), ".parquet": ("parquet", {})}
CHARS_PER_TOKEN = 3  # a low guess, so one read usually covers a batch


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


class StreamLoader:
    """Same API as PackedLoader (next_batch, state_dict, load_state_dict, tokens_per_source) over a stream."""

    def __init__(self, source: str | Path, tokenizer: str | Path | Tokenizer, batch_size: int, seq_len: int,
                 text_key: str = "text", rank: int = 0, world_size: int = 1, name: str | None = None):
        if min(batch_size, seq_len, world_size) < 1 or not 0 <= rank < world_size:
            raise UserError(f"Bad loader shape: batch_size {batch_size}, seq_len {seq_len}, rank {rank}, "
                            f"world_size {world_size}.")
        self.source = str(source)
        self.text_key = text_key
        self.name = name or self.source
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        self.eot_id = self.tok.eot_id
        self.vocab_size = self.tok.vocab_size
        self.tokenizer_identity = self.tok.identity
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        self._epoch_docs = 0
        self._tokens = 0
        self._buffer = np.zeros(0, dtype=np.int64)
        self._ds = self._open(None)
        self._it = None

    def _open(self, dataset_state: Mapping | None):
        ds = open_stream(self.source)
        if self.world_size > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds.set_epoch(self._epoch)
        if dataset_state is not None:
            ds.load_state_dict(dataset_state)
        return ds

    def _read_documents(self, num_chars: int) -> list[str]:
        """At least `num_chars` characters of documents (or whatever is left of this epoch)."""
        if self._it is None:
            self._it = iter(self._ds)
        docs = []
        chars = 0
        while chars < num_chars:
            try:
                row = next(self._it)
            except StopIteration:
                break
            if self.text_key not in row:
                raise UserError(f"Stream {self.source} has no {self.text_key!r} column (columns: "
                                f"{', '.join(row)}); choose one with text_key.")
            docs.append(row[self.text_key] or "")
            chars += len(docs[-1])
        return docs

    def _fill(self, need: int) -> None:
        while len(self._buffer) < need:
            docs = self._read_documents((need - len(self._buffer)) * CHARS_PER_TOKEN)
            if not docs:  # this epoch is over: start the next one from the beginning
                if not self._epoch_docs:
                    raise UserError(f"Stream {self.source} yields no documents (rank {self.rank} of "
                                    f"{self.world_size}).")
                self._epoch = self._epoch + 1
                self._epoch_docs = 0
                self._ds = self._open(None)
                self._it = None
                continue
            self._epoch_docs += len(docs)
            ids = [doc + [self.eot_id] for doc in self.tok.encode_batch(docs)]
            self._buffer = np.concatenate([self._buffer, *(np.asarray(x, dtype=np.int64) for x in ids)])

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) int64 tensor; consecutive rows continue the token stream."""
        b = self.batch_size
        t = self.seq_len
        self._fill(b * t + 1)
        rows = np.lib.stride_tricks.sliding_window_view(self._buffer[:b * t + 1], t + 1)[::t]  # (B, T+1)
        out = torch.from_numpy(np.array(rows))  # a copy: the buffer moves on
        self._buffer = self._buffer[b * t:]  # the last label is the next batch's first input
        self._tokens += b * t
        return out

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Label tokens this rank has served (streams are split by document, so ranks differ)."""
        return {self.name: self._tokens}

    def state_dict(self) -> dict:
        buffer = base64.b64encode(self._buffer.astype("<u4").tobytes()).decode()
        return {"version": 1, "source": self.source, "seq_len": self.seq_len, "epoch": self._epoch,
                "epoch_docs": self._epoch_docs, "dataset": self._ds.state_dict(), "buffer": buffer,
                "tokens": self._tokens, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: reopen the stream at its saved position and restore the unserved tokens."""
        mine = {"source": self.source, "seq_len": self.seq_len, "rank": self.rank, "world_size": self.world_size}
        differs = [k for k, v in mine.items() if state.get(k) != v]
        if differs:
            raise UserError(f"The saved stream state does not fit this loader: {', '.join(differs)} changed.")
        self._epoch = int(state["epoch"])
        self._epoch_docs = int(state["epoch_docs"])
        self._tokens = int(state["tokens"])
        self._buffer = np.frombuffer(base64.b64decode(state["buffer"]), dtype="<u4").astype(np.int64)
        self._ds = self._open(state["dataset"])
        self._it = None
