"""Which documents are held out: chosen by name, or by position for corpora without meaningful names.

By name (`--val-documents GLOB`, `data.datasets[].val_documents`): a document is held out when a glob
matches its source-relative name (`hamlet_gut.txt`, `rows.jsonl#12`) or the file it came from
(`rows.jsonl` holds out every row of that file). Globs are fnmatch patterns, matched case-sensitively;
a glob that matches no document is a mistake, refused before anything is written. Holding out whole works
(every edition of a play) is what keeps a held-out number honest: a near-copy on the training side leaks.

By position (`val_fraction`): evenly spaced documents, deterministic and streaming-friendly (see `is_val`).
A fraction of 1.0 holds out everything: an evaluation-only dataset.

The same selection drives prepare's split and the documents a trained tokenizer may see (only the train
split), so nothing held out shapes the vocabulary.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from smoltrain.data.sources import Document, Source
from smoltrain.errors import UserError


def is_val(index: int, fraction: float) -> bool:
    """Document `index` is held out when round(n * fraction) steps up there: evenly spaced, streaming-friendly,
    and the first n documents hold exactly round(n * fraction) validation documents."""
    return fraction > 0 and math.floor((index + 1) * fraction + 0.5) > math.floor(index * fraction + 0.5)


@dataclass(frozen=True)
class Holdout:
    """The held-out selection of one dataset: `globs` (by name) when given, else `fraction` (by position)."""

    globs: tuple[str, ...] = ()
    fraction: float = 0.0

    def is_val(self, index: int, doc: Document) -> bool:
        if self.globs:
            return any(self._match(doc, g) for g in self.globs)
        return is_val(index, self.fraction)

    @staticmethod
    def _match(doc: Document, glob: str) -> bool:
        return fnmatch.fnmatchcase(doc.name, glob) or fnmatch.fnmatchcase(doc.unit, glob)

    def unmatched(self, docs: Iterable[Document]) -> list[str]:
        """The globs that match none of `docs`."""
        left = set(self.globs)
        for doc in docs:
            left -= {g for g in left if self._match(doc, g)}
            if not left:
                break
        return [g for g in self.globs if g in left]

    def check_files(self, sources: list[Source]) -> None:
        """Refuse, before any work, globs that match no file of local sources (globs naming rows, `#`, and
        hf sources are checked after reading, still before anything is committed)."""
        if not self.globs or any(s.kind == "hf" for s in sources):
            return
        units = [Document(s.unit_name(p), s.unit_name(p), "") for s in sources for p in s.files]
        missing = [g for g in self.unmatched(units) if "#" not in g]
        if missing:
            raise_unmatched(missing, [d.name for d in units])

    def holds_out_every_file(self, sources: list[Source]) -> bool:
        """Every file of these local sources matches a glob: nothing would be left to train on."""
        if not self.globs or any(s.kind == "hf" for s in sources):
            return False
        units = [Document(s.unit_name(p), s.unit_name(p), "") for s in sources for p in s.files]
        return bool(units) and all(any(self._match(d, g) for g in self.globs) for d in units)

    def train_texts(self, docs: Iterable[Document]) -> Iterator[str]:
        """The texts of the training side only (what a tokenizer may be trained on)."""
        for i, doc in enumerate(docs):
            if not self.is_val(i, doc):
                yield doc.text


def raise_unmatched(globs: list[str], names: list[str]) -> None:
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise UserError(f"--val-documents {', '.join(globs)} match{'es' if len(globs) == 1 else ''} no document "
                    f"(documents are named relative to their source, e.g. {shown}); fix the glob.")
