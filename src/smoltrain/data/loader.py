"""Packed training batches over prepared datasets: a weighted, staged mixture, sharded across ranks.

The token stream of each source's split is cut into windows of T+1 tokens with stride T (window w covers
tokens [w*T, w*T + T]), so every token is a label exactly once per epoch. Each source visits its windows in
an order shuffled per epoch by its own generator seeded from (seed, source name, epoch).

One optimizer step consumes a *global batch* of G = batch_size * world_size * grad_accum_steps windows. Which
source fills each of the G rows is drawn from the weights in force at that step by a generator seeded from
(seed, step); every rank draws the whole global batch (just indices, cheap) and reads only its own rows:
micro-step m on rank r reads rows [(m * world_size + r) * B, ... + B). So "2 accumulation steps x 1 process"
and "1 step x 2 processes" see the same windows, the union over ranks is the single-process batch, and the
state (step, micro-step, per-source cursors) is the same on every rank: any rank's state_dict() resumes all.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from smoltrain.data.shards import check_vocab, load_meta, read_shard, split_shards
from smoltrain.errors import UserError

__all__ = ["Mixture", "PackedLoader", "check_vocab", "eval_spans", "eval_windows", "ordered_batches"]

_MIX = 0x6D6978  # generator purposes, so the mixture and the shuffles never share draws
_PERM = 0x7065726D


class TokenSource:
    """One prepared directory's split as a single memory-mapped token stream, read in windows."""

    def __init__(self, name: str, directory: str | Path, split: str, seq_len: int):
        self.name = name
        self.directory = Path(directory)
        self.seq_len = seq_len
        self.meta = load_meta(self.directory)
        splits = self.meta["splits"]
        if split not in splits:
            raise UserError(f"{self.directory} has no {split!r} split (it has {', '.join(splits)}).")
        self.shards = [read_shard(p) for p in split_shards(self.directory, self.meta, split)]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.offsets[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)
        self.key = zlib.crc32(name.encode())

    def read(self, window: int, out: np.ndarray) -> None:
        """Copy window `window` (T+1 tokens) into `out`, across a shard boundary if need be."""
        self.read_span(window * self.seq_len, window * self.seq_len + self.seq_len + 1, out)

    def read_span(self, start: int, end: int, out: np.ndarray) -> None:
        """Copy tokens [start, end) into `out`."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = 0
        while start < end:
            lo = start - self.offsets[i]
            take = min(end - start, len(self.shards[i]) - lo)
            out[pos:pos + take] = self.shards[i][lo:lo + take]
            pos = pos + take
            start = start + take
            i = i + 1


def named_datasets(datasets: Mapping[str, str | Path] | str | Path | list) -> dict[str, str | Path]:
    if isinstance(datasets, (str, Path)):
        datasets = [datasets]
    if isinstance(datasets, Mapping):
        return dict(datasets)
    named = {Path(d).name: d for d in datasets}
    if len(named) != len(datasets):
        raise UserError("Two datasets share a directory name; pass them as a {name: directory} mapping.")
    return named


def _normalise(weights: Mapping[str, float], names: list[str], where: str) -> np.ndarray:
    unknown = set(weights) - set(names)
    if unknown:
        raise UserError(f"{where} names unknown dataset(s) {', '.join(sorted(unknown))} "
                        f"(datasets: {', '.join(names)}).")
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise UserError(f"{where} must be non-negative numbers with a positive sum, got {dict(weights)}.")
    return w / w.sum()


def _stages(stages: list | None, weights: Mapping[str, float] | None, names: list[str]) -> list:
    """[(start_step, normalised weights)], sorted, always starting at step 0."""
    base = _normalise(weights, names, "weights") if weights else np.full(len(names), 1 / len(names))
    out = [(0, base)]
    prev = -1
    for i, st in enumerate(stages or []):
        if not isinstance(st, Mapping) or "weights" not in st:
            raise UserError(f"Data stage {i} must be a mapping with start_step and weights, got {st!r}.")
        start = int(st.get("start_step", 0))
        if start <= prev:
            raise UserError("Data stages must have increasing, non-negative start_step values.")
        w = _normalise(st["weights"], names, f"Data stage {i} weights")
        out = [s for s in out if s[0] < start] + [(start, w)]
        prev = start
    return out


class Mixture:
    """Which dataset fills each row of a global batch: drawn from the weights in force at a step by a
    generator seeded from (seed, step), so every rank, every resume and every loader kind draws the same."""

    def __init__(self, names: list[str], weights: Mapping[str, float] | None, stages: list | None, seed: int):
        self.names = names
        self.stages = _stages(stages, weights, names)
        self.seed = seed

    def weights_at(self, step: int) -> dict[str, float]:
        w = next(w for start, w in reversed(self.stages) if start <= step)
        return dict(zip(self.names, map(float, w)))

    def draw(self, step: int, size: int) -> np.ndarray:
        """The dataset index of each of `size` rows at optimizer step `step`."""
        if len(self.names) == 1:
            return np.zeros(size, np.int64)
        w = np.array([self.weights_at(step)[n] for n in self.names])
        return np.random.default_rng([self.seed, _MIX, step]).choice(len(self.names), size=size, p=w)


class PackedLoader:
    """Packed (B, T+1) LongTensor windows: inputs = w[:, :-1], labels = w[:, 1:] (see the module docstring)."""

    def __init__(self, datasets: Mapping[str, str | Path] | str | Path | list, batch_size: int, seq_len: int,
                 seed: int = 0, split: str = "train", stages: list | None = None,
                 weights: Mapping[str, float] | None = None, rank: int = 0, world_size: int = 1,
                 grad_accum_steps: int = 1):
        if min(batch_size, seq_len, world_size, grad_accum_steps) < 1 or not 0 <= rank < world_size:
            raise UserError(f"Bad loader shape: batch_size {batch_size}, seq_len {seq_len}, rank {rank}, "
                            f"world_size {world_size}, grad_accum_steps {grad_accum_steps}.")
        if not isinstance(seed, int) or seed < 0:
            raise UserError(f"The data seed must be a non-negative integer, got {seed!r}.")
        named = named_datasets(datasets)
        if not named:
            raise UserError("No datasets given to the loader.")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.grad_accum_steps = grad_accum_steps
        self.sources = [TokenSource(n, d, split, seq_len) for n, d in named.items()]
        self.names = [s.name for s in self.sources]
        self._check_sources()
        self.mixture = Mixture(self.names, weights, stages, seed)
        self.stages = self.mixture.stages
        self._step = 0
        self._micro = 0
        self._cursors = [(0, 0)] * len(self.sources)  # (epoch, position in that epoch's order) per source
        self._tokens = [0] * len(self.sources)
        self._plan: tuple | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _check_sources(self) -> None:
        first = self.sources[0].meta
        self.vocab_size = first["vocab_size"]
        self.tokenizer_identity = first["tokenizer"]
        self.eot_id = first["eot_id"]
        need = self.batch_size * self.world_size
        for s in self.sources:
            if s.meta["tokenizer"]["sha256"] != self.tokenizer_identity["sha256"]:
                raise UserError(f"Datasets {self.sources[0].name} and {s.name} were prepared with different "
                                f"tokenizers ({self.tokenizer_identity['source']} vs "
                                f"{s.meta['tokenizer']['source']}); a mixture needs one tokenizer.")
            if s.num_windows < need:
                raise UserError(f"Dataset {s.name} ({s.directory}, split {self.split}) has {s.num_tokens} tokens, "
                                f"that is {s.num_windows} windows of seq_len {self.seq_len} + 1; one batch needs "
                                f"{need} windows (batch_size {self.batch_size} x world_size {self.world_size}). "
                                "Use more data, a shorter seq_len or a smaller batch.")


    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum_steps

    def weights_at(self, step: int) -> dict[str, float]:
        return self.mixture.weights_at(step)

    def _perm(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            src = self.sources[k]
            rng = np.random.default_rng([self.seed, _PERM, src.key, epoch])
            dtype = np.int32 if src.num_windows < 2**31 else np.int64
            self._perms = {kk: v for kk, v in self._perms.items() if kk[0] != k or kk[1] >= epoch - 1}
            self._perms[key] = rng.permutation(src.num_windows).astype(dtype)
        return self._perms[key]

    def _take(self, k: int, cursor: tuple[int, int], n: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The next `n` windows of source k from `cursor`, crossing into new epochs as needed."""
        epoch, pos = cursor
        total = self.sources[k].num_windows
        parts = []
        while n > 0:
            take = min(n, total - pos)
            if pos == 0 and epoch > 0 and self.rank == 0:
                self._say_new_pass(k, epoch)
            parts.append(self._perm(k, epoch)[pos:pos + take])
            n = n - take
            pos = pos + take
            if pos == total:
                epoch = epoch + 1
                pos = 0
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), (epoch, pos)

    def _say_new_pass(self, k: int, epoch: int) -> None:
        src = self.sources[k]
        print(f"Data: starting pass {epoch + 1} over {src.name} (all {src.num_tokens:,} tokens of its {self.split} "
              f"split were read {epoch} time{'s' if epoch > 1 else ''})", flush=True)

    def _make_plan(self) -> tuple[np.ndarray, np.ndarray, list]:
        """(source of each global row, window of each global row, cursors after this step)."""
        g = self.global_batch
        names = self.names
        src = self.mixture.draw(self._step, g)
        win = np.zeros(g, np.int64)
        after = list(self._cursors)
        for k in range(len(names)):
            rows = np.flatnonzero(src == k)
            win[rows], after[k] = self._take(k, after[k], len(rows))
        return src, win, after


    def next_batch(self) -> torch.Tensor:
        """This rank's next micro-batch: a (batch_size, seq_len + 1) int64 tensor."""
        if self._plan is None:
            self._plan = self._make_plan()
        src, win, after = self._plan
        b = self.batch_size
        t = self.seq_len
        lo = (self._micro * self.world_size + self.rank) * b
        out = np.empty((b, t + 1), dtype=np.int64)
        for j in range(b):
            self.sources[src[lo + j]].read(int(win[lo + j]), out[j])
        group = src[self._micro * self.world_size * b:(self._micro + 1) * self.world_size * b]
        for k, n in enumerate(np.bincount(group, minlength=len(self.sources))):
            self._tokens[k] += int(n) * t  # every rank counts the whole micro-step: totals, not per rank
        self._micro += 1
        if self._micro == self.grad_accum_steps:
            self._step = self._step + 1
            self._micro = 0
            self._cursors = after
            self._plan = None
        return torch.from_numpy(out)

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Label tokens served so far per dataset, summed over all ranks (the same number on every rank)."""
        return dict(zip(self.names, self._tokens))

    def state_dict(self) -> dict:
        return {
            "version": 1, "step": self._step, "micro_step": self._micro,
            "cursors": {n: list(c) for n, c in zip(self.names, self._cursors)},
            "tokens_per_source": self.tokens_per_source,
            "seed": self.seed, "seq_len": self.seq_len, "split": self.split, "global_batch": self.global_batch,
            "num_tokens": {s.name: s.num_tokens for s in self.sources},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue exactly where the loader that saved `state` stopped (any rank's state will do)."""
        mine = {"seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "num_tokens": {s.name: s.num_tokens for s in self.sources}}
        differs = [k for k, v in mine.items() if state.get(k) != v]
        if state.get("micro_step", 0) and state.get("global_batch") != self.global_batch:
            differs.append("global_batch (mid-step)")
        if differs:
            raise UserError(f"The saved data loader state does not fit this loader: {', '.join(differs)} changed "
                            "(different datasets, seq_len, seed or split). Resume with the same data settings.")
        self._step = int(state["step"])
        self._micro = int(state["micro_step"])
        self._cursors = [tuple(state["cursors"][n]) for n in self.names]
        self._tokens = [int(state["tokens_per_source"][n]) for n in self.names]
        self._plan = None


def ordered_batches(sources: list[TokenSource], batch_size: int, max_batches: int | None = None, rank: int = 0,
                    world_size: int = 1, keep_partial: bool = False) -> Iterator[torch.Tensor]:
    """Windows of `sources` laid end to end, in stored order: global batch j is windows
    [j * B * world, (j + 1) * B * world), of which rank r takes the r-th block of B. Every rank yields the
    same number of batches; `keep_partial` (single process only) also yields a shorter last batch."""
    starts = np.cumsum([0] + [s.num_windows for s in sources])
    total = int(starts[-1])
    per = batch_size * world_size
    bounds = [(j * per + rank * batch_size, j * per + (rank + 1) * batch_size) for j in range(total // per)]
    if keep_partial and world_size == 1 and total % per:
        bounds.append((total - total % per, total))
    for lo, hi in bounds[:max_batches]:
        out = np.empty((hi - lo, sources[0].seq_len + 1), dtype=np.int64)
        for i, p in enumerate(range(lo, hi)):
            k = int(np.searchsorted(starts, p, side="right")) - 1
            sources[k].read(p - int(starts[k]), out[i])
        yield torch.from_numpy(out)


def eval_spans(num_tokens: int, seq_len: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """The [start, end) token spans an evaluation reads: windows of T+1 tokens with stride T, so every token
    after the first is predicted exactly once and the last window may be short; or, when `max_tokens` is
    below that, max_tokens // T full windows evenly spaced over the whole split (a fixed sample that reaches
    every part of it, not its first documents)."""
    predicted = max(0, num_tokens - 1)
    full, rest = divmod(predicted, seq_len)
    spans = [(w * seq_len, w * seq_len + seq_len + 1) for w in range(full)]
    if rest:
        spans.append((full * seq_len, num_tokens))
    if max_tokens is None or max_tokens >= predicted or not full:
        return spans
    k = max(1, min(full, max_tokens // seq_len))
    return [spans[(2 * i + 1) * full // (2 * k)] for i in range(k)]


def eval_windows(directory: str | Path, split: str, seq_len: int, batch_size: int,
                 max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """(B, T+1) batches over one prepared split for evaluation, the same on every call (see eval_spans);
    a short last window comes alone, as a (1, L+1) batch, so no padding is ever needed."""
    source = TokenSource(Path(directory).name, directory, split, seq_len)
    spans = eval_spans(source.num_tokens, seq_len, max_tokens)
    full = [s for s in spans if s[1] - s[0] == seq_len + 1]
    for lo in range(0, len(full), batch_size):
        group = full[lo:lo + batch_size]
        out = np.empty((len(group), seq_len + 1), dtype=np.int64)
        for row, (start, end) in enumerate(group):
            source.read_span(start, end, out[row])
        yield torch.from_numpy(out)
    for start, end in (s for s in spans if s[1] - s[0] != seq_len + 1):
        out = np.empty((1, end - start), dtype=np.int64)
        source.read_span(start, end, out[0])
        yield torch.from_numpy(out)
