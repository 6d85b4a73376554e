"""Token shard files: a 64-byte header (magic, version, dtype, counts) then the raw little-endian tokens.

The header is checked on every read, and the file size must match the count it declares, so a truncated or
foreign file is refused instead of silently training on garbage (modded-nanogpt does the same).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from smoltrain.errors import UserError
from smoltrain.storage import contained, shown

MAGIC = b"SMOLTOK\x00"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize (2: uint16, 4: uint32), num_tokens, num_documents
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(max_token_id: int) -> np.dtype:
    """uint16 halves disk and page cache whenever every id fits (SmolLM2's 49152 does)."""
    return DTYPES[2] if max_token_id < 2**16 else DTYPES[4]


def _header(itemsize: int, num_tokens: int, num_documents: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, itemsize, num_tokens, num_documents).ljust(HEADER_BYTES, b"\0")


class ShardWriter:
    """Append token arrays to `{prefix}_{NNNNNN}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.directory = Path(directory)
        self.prefix = prefix
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []  # {"file", "num_tokens", "num_documents"} of closed shards
        self._f = None
        self._tokens = self._docs = 0

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._f = open(self.directory / name, "wb")
        self._f.write(_header(self.dtype.itemsize, 0, 0))  # placeholder: an unfinished shard declares nothing
        self._name = name
        self._tokens = 0
        self._docs = 0

    def write(self, tokens: np.ndarray, num_documents: int) -> None:
        """Append tokens; the documents are counted in the shard where their last token lands."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        if not len(tokens) and not num_documents:
            return
        while True:
            if self._f is None:
                self._open()
            room = self.shard_tokens - self._tokens
            head, tokens = tokens[:room], tokens[room:]
            self._f.write(head.tobytes())
            self._tokens += len(head)
            if not len(tokens):
                self._docs += num_documents
                return
            self._close()

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.seek(0)
        self._f.write(_header(self.dtype.itemsize, self._tokens, self._docs))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.shards.append({"file": self._name, "num_tokens": self._tokens, "num_documents": self._docs})
        self._f = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"Cannot read token shard {path}: {e}") from None
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise UserError(f"{path} is not a smoltrain token shard (bad magic); re-run smoltrain prepare.")
    _, version, itemsize, num_tokens, _ = _HEADER.unpack(raw[:_HEADER.size])
    if version != VERSION or itemsize not in DTYPES:
        raise UserError(f"{path} has shard format version {version}, dtype size {itemsize}; this smoltrain reads "
                        f"version {VERSION} with 2- or 4-byte tokens. Re-run smoltrain prepare.")
    if size != HEADER_BYTES + num_tokens * itemsize:
        raise UserError(f"{path} is truncated or damaged: its header declares {num_tokens} tokens "
                        f"({HEADER_BYTES + num_tokens * itemsize} bytes) but the file has {size} bytes.")
    if num_tokens == 0:
        return np.zeros(0, dtype=DTYPES[itemsize])
    return np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


META_FORMAT = "smoltrain-tokens"


def load_meta(directory: str | Path) -> dict:
    """meta.json of a prepared directory; it is written last, so its presence means the directory is complete."""
    path = Path(directory) / "meta.json"
    if not Path(directory).is_dir():
        raise UserError(f"Prepared data directory {directory} does not exist; create it with smoltrain prepare.")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} is not a prepared dataset (no meta.json); create it with smoltrain "
                        "prepare.") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); re-run smoltrain prepare --force.") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path} is not a smoltrain prepared dataset of format version {VERSION}.")
    return meta


def split_shards(directory: str | Path, meta: dict, split: str) -> list[Path]:
    """The shard files of one split, each name meta.json gives checked to stay inside the directory."""
    shards = meta.get("splits", {}).get(split, {}).get("shards") if isinstance(meta.get("splits"), dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise UserError(f"{directory}/meta.json has no shard list for its {split!r} split; re-run smoltrain "
                        f"prepare --force. (got {shown(shards)})")
    return [contained(directory, s.get("file"), "meta.json shard") for s in shards]


def check_vocab(data: dict | str | Path | object, model_vocab_size: int) -> None:
    """Refuse data whose tokenizer has more ids than the model's embedding has rows.

    `data` is a meta.json dict, a prepared directory, or anything with a `vocab_size` (a loader, a tokenizer).
    """
    if isinstance(data, dict):
        vocab = data["vocab_size"]
    elif isinstance(data, (str, Path)):
        vocab = load_meta(data)["vocab_size"]
    else:
        vocab = data.vocab_size
    if vocab > model_vocab_size:
        raise UserError(f"The data's tokenizer has {vocab} tokens but the model's vocab_size is "
                        f"{model_vocab_size}: token ids would index past the embedding. Use a model with "
                        f"vocab_size >= {vocab} or prepare the data with a smaller tokenizer.")
