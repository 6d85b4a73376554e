"""Resolve a tokenizer from a hub id, a directory, a tokenizer.json or a .gguf file.

Everything downstream uses HF `tokenizers` directly (fast to import, fast batch encoding); transformers
is only imported to convert a GGUF's embedded tokenizer and to write files `AutoTokenizer` can load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from smoltrain.errors import UserError
from smoltrain.storage import publish, sha256_file, sha256_text

EOT = "<|endoftext|>"  # document separator in SmolLM2's cosmo2 tokenizer (id 0)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # SmolLM2's chat turn markers (ids 1 and 2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def cache_dir() -> Path:
    """Where smoltrain keeps fetched assets and converted artifacts (SMOLTRAIN_CACHE overrides)."""
    return Path(os.environ.get("SMOLTRAIN_CACHE", Path.home() / ".cache" / "smoltrain"))


def read_backend(path: Path) -> _HFTokenizer:
    """A tokenizers backend from tokenizer.json; a file that is not one is the user's error, not a crash."""
    try:
        return _HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(f"{path} is not a valid tokenizers JSON file: {e}") from None


class Tokenizer:
    """A thin wrapper: encode without special tokens, the `<|endoftext|>` id, and a stable identity."""

    def __init__(self, directory: Path, source: str):
        self.directory = Path(directory)
        self.source = source
        path = self.directory / "tokenizer.json"
        self.backend = read_backend(path)
        self.sha256 = sha256_file(path)
        config = self.directory / "tokenizer_config.json"
        try:
            self.config = json.loads(config.read_text()) if config.exists() else {}
        except (OSError, ValueError) as e:
            raise UserError(f"{config} is unreadable ({e}).") from None
        if not isinstance(self.config, dict):
            raise UserError(f"{config} must hold a JSON object, not {type(self.config).__name__}.")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of `<|endoftext|>`, appended after every document when preparing data."""
        tid = self.backend.token_to_id(EOT)
        if tid is None:
            raise UserError(f"Tokenizer {self.source} has no {EOT} token; smoltrain separates documents with it. "
                            "Add it as a special token (smoltrain tokenizer train does).")
        return tid

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def identity(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, out: str | Path) -> None:
        """Copy the tokenizer files into `out` (a checkpoint or HF directory)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        same = out.resolve() == self.directory.resolve()
        for name in TOKENIZER_FILES:
            if not same and (self.directory / name).exists():
                shutil.copyfile(self.directory / name, out / name)
        if not (out / "tokenizer_config.json").exists():  # a bare tokenizer.json: make AutoTokenizer happy
            cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}
            for key, tok in (("eos_token", EOT), ("bos_token", EOT), ("unk_token", EOT)):
                if self.backend.token_to_id(tok) is not None:
                    cfg[key] = tok
            (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _from_gguf(path: Path) -> Path:
    """Convert the tokenizer embedded in a GGUF file once, into the cache, keyed by the file's identity."""
    st = path.stat()
    key = sha256_text(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")[:16]
    target = cache_dir() / "tokenizers" / f"{path.stem}-{key}"
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # gguf without a usable tokenizer, or not a gguf at all
        raise UserError(f"Could not read a tokenizer from {path}: {e}") from None
    with publish(target, "tokenizer-cache", {"source": str(path)}, hashed=False, keep_existing=True) as staging:
        tok.save_pretrained(str(staging))  # another process may have filled the cache first: then theirs stays
    return target


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as e:
        raise UserError(f"Tokenizer {repo_id!r} is not a local path, and fetching it from the Hugging Face hub "
                        f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass a "
                        "directory, a tokenizer.json or a .gguf file, or run where the hub is reachable.") from None


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Resolve `spec`: a directory holding tokenizer.json, a tokenizer.json, a .gguf, or a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise UserError(f"Directory {path} holds no tokenizer.json.")
        return Tokenizer(path, str(spec))
    if path.is_file():
        if path.suffix == ".gguf":
            return Tokenizer(_from_gguf(path), str(spec))
        if path.name.endswith(".json"):
            read_backend(path)  # before a copy of it lands in the cache
            tmp = cache_dir() / "tokenizers" / ("json-" + sha256_file(path)[:16])
            tmp.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / "tokenizer.json")
            return Tokenizer(tmp, str(spec))
        raise UserError(f"Tokenizer {path} is neither a directory, a tokenizer.json nor a .gguf file.")
    if str(spec).count("/") == 1 and not str(spec).startswith((".", "/", "~")):
        return Tokenizer(_from_hub(str(spec)), str(spec))
    raise UserError(f"Tokenizer path {spec} does not exist.")


class NoText(UserError):
    """train_bpe saw no text: the caller names its sources in the message it raises instead."""


def _specials(extra: list[str] | tuple[str, ...]) -> list[str]:
    return [EOT, *CHAT_TOKENS, *(t for t in extra if t not in (EOT, *CHAT_TOKENS))]


def check_vocab_size(vocab_size: int, extra: list[str] | tuple[str, ...]) -> None:
    need = len(_specials(extra)) + 256  # every byte, then the special tokens
    if vocab_size < need:
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {need} ids "
                        f"(256 bytes + {need - 256} special tokens).")


def train_bpe(documents, vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2,
              extra_special_tokens: list[str] | tuple[str, ...] = (), show_progress: bool = False,
              force: bool = False) -> Tokenizer:
    """Train a byte-level BPE the way SmolLM2's cosmo2 tokenizer was made, on an iterable of texts (the caller
    chooses them: e.g. only a training split; data.prepare.train_tokenizer reads them from sources).

    `<|endoftext|>` is id 0, `<|im_start|>` 1 and `<|im_end|>` 2; digits are split one by one before the
    byte-level split (as cosmo2 does). `out_dir` gets tokenizer.json and tokenizer_config.json, so both
    `load_tokenizer(out_dir)` and `transformers.AutoTokenizer.from_pretrained(out_dir)` load it.

    Published by storage.publish; with `force` it replaces an earlier tokenizer output only."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size, extra_special_tokens)
    special = _specials(extra_special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    out = Path(out_dir).expanduser()
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=show_progress)
    texts = [0]  # documents with any text: the alphabet alone (no merges) is not a trained tokenizer

    def counted():
        for doc in documents:
            texts[0] += bool(doc.strip())
            yield doc

    backend.train_from_iterator(counted(), trainer)
    if not texts[0] or backend.get_vocab_size() == len(special):
        raise NoText("The documents hold no text to train a tokenizer on.")

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "bos_token": EOT,
              "eos_token": EOT, "unk_token": EOT, "pad_token": EOT, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "additional_special_tokens": special[1:]}
    with publish(out, "tokenizer", {"vocab_size": vocab_size}, hashed=False, replace=force) as staging:
        backend.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")},
            indent=2) + "\n")
    return Tokenizer(out, str(out))
