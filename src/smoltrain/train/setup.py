"""What a training run needs before step 1: checked inputs, the batch layout, and the data.

Rank 0 fetches assets, trains the tokenizer and prepares datasets; the other ranks wait at a barrier
and then read what it wrote (quietly), so every rank ends with the same tokenizer and data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from smoltrain import distributed as dist_io
from smoltrain.data.recipe import input_problems, vocab_mismatch
from smoltrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from smoltrain.checkpoint.layout import LocalLayout
    from smoltrain.config import Config, TrainConfig
    from smoltrain.data.tokenizer import Tokenizer
    from smoltrain.distributed import DistEnv
    from smoltrain.model.llama import SmolLM2


def check_inputs(cfg: Config) -> None:
    """Refuse a config without data, with missing local inputs or a tokenizer too large for the model before
    the run dir is touched or any asset fetched (the CLI runs input_problems with the config's own checks,
    so a user sees every problem in one message)."""
    problems = input_problems(cfg)
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")


def apply_global_batch(train: TrainConfig, world_size: int) -> None:
    """train.global_batch_size fixes the batch across world sizes: accumulation makes up the rest."""
    if train.global_batch_size is None:
        return
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size {train.global_batch_size} is not divisible by "
                        f"micro_batch_size {train.micro_batch_size} x world size {world_size} = {per_step}; "
                        "change one of them.")
    train.grad_accum_steps = train.global_batch_size // per_step


def setup_data(cfg: Config, dist: DistEnv, layout: LocalLayout) -> tuple[Tokenizer, object, dict[str, Path] | None]:
    """(tokenizer, training loader, every dataset's prepared directory or None for a stream).

    The process that leads its run dir (`layout`) prepares first; nodes that prepared apart must agree."""
    from smoltrain.data.loader import PackedLoader
    from smoltrain.data.recipe import prepare_datasets, resolve_tokenizer

    if cfg.data.streaming:
        return setup_stream(cfg, dist, layout)
    def prepare() -> tuple[Tokenizer, dict[str, Path]]:
        tokenizer = resolve_tokenizer(cfg, verbose=dist.is_main)
        return tokenizer, prepare_datasets(cfg, tokenizer, verbose=dist.is_main)

    tokenizer, paths = dist_io.main_first(prepare, layout.leads_dir)
    layout.check_same_data(tokenizer, paths)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        message = vocab_mismatch(cfg, tokenizer.vocab_size)
        raise UserError(message[0].upper() + message[1:] + ".")
    t = cfg.train
    trained = {d.name: d.weight for d in cfg.data.datasets if not d.eval_only(cfg.data.val_fraction)}
    stages = cfg.to_dict()["data"]["stages"]  # plain dicts, as the loader takes them
    loader = PackedLoader({n: paths[n] for n in trained}, split="train", weights=trained,
                          stages=stages or None, batch_size=t.micro_batch_size, seq_len=t.seq_len, seed=t.seed,
                          rank=dist.rank, world_size=dist.world_size, grad_accum_steps=t.grad_accum_steps)
    return tokenizer, loader, paths  # paths: every dataset's held-out split, evaluation-only ones included


def setup_stream(cfg: Config, dist: DistEnv, layout: LocalLayout) -> tuple[Tokenizer, object, None]:
    """data.streaming: tokenize and pack one source on the fly; no prepare step, no held-out split."""
    from smoltrain.data.recipe import resolve_asset, resolve_tokenizer
    from smoltrain.data.stream import StreamLoader

    if len(cfg.data.datasets) != 1 or len(cfg.data.datasets[0].sources) != 1:
        raise UserError("data.streaming trains from exactly one dataset with one source; prepare the data "
                        "(data.streaming: false) to mix several.")
    ds = cfg.data.datasets[0]
    def resolve() -> tuple[Tokenizer, str]:
        return resolve_tokenizer(cfg, verbose=dist.is_main), resolve_asset(ds.sources[0])

    tokenizer, source = dist_io.main_first(resolve, layout.leads_dir)  # rank 0 fetches and trains first
    layout.check_same_data(tokenizer, {})
    loader = StreamLoader(source, tokenizer, cfg.train.micro_batch_size, cfg.train.seq_len,
                          text_key=cfg.data.text_key, rank=dist.rank, world_size=dist.world_size,
                          name=ds.name)
    return tokenizer, loader, None  # a stream has no held-out split: evaluations are skipped


def initial_model(cfg: Config, ckpt: Path | None, device: torch.device) -> SmolLM2:
    """The weights to start from, in train mode: the resume checkpoint's, train.init_from's, or fresh."""
    from smoltrain.hf import interop as interop
    from smoltrain.model.llama import build_model

    source = ckpt or cfg.train.init_from
    if source:  # a resume checkpoint was verified by find_resume; init_from is resolved here
        load = interop.load_resolved if ckpt else interop.load_model
        model, _, src = load(source, device=device, need_tokenizer=False)
        if model.config != cfg.model:
            what = "train.init_from " if ckpt is None else "The checkpoint "
            raise UserError(f"{what}{src} has another shape than the config's model section; set model to "
                            f"match it: {model.config}")
        model = model.train()
    else:
        model = build_model(cfg.model, device).train()
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    return model
