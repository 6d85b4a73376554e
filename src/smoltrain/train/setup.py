"""What a training run needs before step 1: checked inputs, the batch layout, and the data.

Rank 0 fetches assets, trains the tokenizer and prepares datasets; the other ranks wait at a barrier
and then read what it wrote (quietly), so every rank ends with the same tokenizer and data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from smoltrain import distributed as dist_io
from smoltrain.containment import shown
from smoltrain.data.recipe import all_held_out, input_problems, stale_datasets, vocab_mismatch
from smoltrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from smoltrain.checkpoint.layout import LocalLayout
    from smoltrain.config import Config
    from smoltrain.data.tokenizer import Tokenizer
    from smoltrain.distributed import DistEnv
    from smoltrain.model.llama import SmolLM2


def check_inputs(cfg: Config) -> None:
    """Refuse a config without data, with missing local inputs, a tokenizer too large for the model, output
    dirs blocked by files, stale prepared data, bad eval tasks or an init_from of another shape, before the run
    dir is touched or any asset fetched (the CLI runs input_problems with the config's own checks, so a user
    sees those problems in one message)."""
    problems = input_problems(cfg)
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")
    blocked = [f"{key} {p} ({q} is a file)" for key, p in _output_dirs(cfg)
               for q in (p, *p.parents) if q.exists() and not q.is_dir()][:1]
    if blocked:
        raise UserError(f"A directory the run writes is blocked by a file: {blocked[0]}; choose another path.")
    stale = all_held_out(cfg) + stale_datasets(cfg)
    if stale:
        raise UserError("The config's data cannot be used: " + "; ".join(stale) + ".")
    from smoltrain.eval.configured import check_eval_tasks

    check_eval_tasks(cfg)
    check_init_from(cfg)


def _output_dirs(cfg: Config) -> list[tuple[str, Path]]:
    """The directories a run creates: run.dir, run.data_dir and the datasets it prepares."""
    dirs = [("run.dir", Path(cfg.run.dir).expanduser()), ("run.data_dir", cfg.data_dir.expanduser())]
    return dirs + [(f"data.datasets[{d.name}].path", Path(d.path).expanduser()) for d in cfg.data.datasets
                   if d.path and d.sources]


def check_init_from(cfg: Config) -> None:
    """train.init_from must have the config's model shape: read from its config.json now, before any work."""
    from smoltrain.checkpoint.discovery import resolve_checkpoint
    from smoltrain.hf.interop import read_hf_config

    src = cfg.train.init_from
    if not src or "://" in src or not Path(src).expanduser().is_dir():
        return
    shape = read_hf_config(resolve_checkpoint(src))
    if shape != cfg.model:
        raise UserError(f"train.init_from {src} has another shape than the config's model section; set model to "
                        f"match it: {shape}")


def check_prompts(cfg: Config, tokenizer: Tokenizer) -> None:
    """eval.prompts are sampled at the end of the run: each must encode to something that leaves room in
    the model's context for at least one new token. Checked before step 1, never after training."""
    limit = cfg.model.max_position_embeddings
    for prompt in cfg.eval.prompts:
        n = len(tokenizer.encode(prompt))
        if n == 0 or n >= limit:
            raise UserError(f"eval.prompts {shown(prompt, 60)} is {n} tokens; a prompt must be 1 to {limit - 1} tokens "
                            f"(model.max_position_embeddings {limit}). Nothing was trained.")


def check_data_budget(cfg: Config, world_size: int, verbose: bool = False) -> None:
    """Refuse a run that would read a prepared dataset more than data.max_epochs times (before the run dir is
    touched when the data was prepared earlier; right after prepare otherwise); print planned vs available."""
    from smoltrain.data.budget import available, budget_line, check_passes

    if cfg.data.streaming:
        return
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size
    trained = [d for d in cfg.data.datasets if not d.eval_only(cfg.data.val_fraction)]
    avail = {d.name: available(cfg, d) for d in trained}
    check_passes(cfg, global_batch, avail)
    if verbose and all(a.exact for a in avail.values()):
        print(budget_line(cfg, global_batch, avail), flush=True)


def cpu_fallback(cfg: Config, device: torch.device, is_main: bool) -> Config:
    """A GPU recipe on a CPU: bf16 becomes fp32 and torch.compile goes off (said once; a new Config, the one the
    run saves), and a step whose memory (the plan's figure, train.memory) exceeds this machine's available
    memory is refused up front."""
    if device.type != "cpu":
        return cfg
    changes = {}
    if cfg.train.dtype == "bf16":
        changes["bf16 -> fp32 (CPU bf16 matmuls are many times slower than fp32)"] = ("dtype", "fp32")
    if cfg.train.compile:
        changes["torch.compile off (minutes of compiling for little gain on a CPU)"] = ("compile", False)
    if changes:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **dict(changes.values())))
        if is_main:
            print("This recipe asks for GPU settings but runs on a CPU: " + "; ".join(changes) + ".", flush=True)
    if changes or num_params(cfg) * 16 > 2**30:  # a small CPU model needs no check
        check_cpu_memory(cfg)
    return cfg


def num_params(cfg: Config) -> int:
    import torch

    from smoltrain.model.llama import SmolLM2

    with torch.device("meta"):
        return SmolLM2(cfg.model).num_params()


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_cpu_memory(cfg: Config) -> None:
    import torch

    from smoltrain.model.loss import auto_chunk
    from smoltrain.train.memory import GIB, measure_step

    t = cfg.train
    free = available_memory()
    if free is None:
        return
    rows = t.micro_batch_size * t.seq_len
    chunk = auto_chunk(rows, cfg.model.vocab_size, torch.device("cpu")) if t.loss_chunk == "auto" else t.loss_chunk
    peak = measure_step(cfg.model, cfg.optim, t.micro_batch_size, t.seq_len, amp=False,
                        activation_checkpointing=t.activation_checkpointing, loss_chunk=chunk).peak
    if peak > free:
        raise UserError(f"One training step of this recipe needs about {peak / GIB:.1f} GiB on this CPU (fp32, micro "
                        f"batch {t.micro_batch_size} x {t.seq_len}: the plan's figure, smoltrain plan) but the machine "
                        f"has {free / GIB:.1f} GiB available. Lower train.micro_batch_size (raise grad_accum_steps "
                        "to keep tokens per step) or train.seq_len, turn on train.activation_checkpointing, or run "
                        "it on a GPU.")


def with_global_batch(cfg: Config, world_size: int) -> Config:
    """train.global_batch_size fixes the batch across world sizes: accumulation makes up the rest.

    Returns a new Config (the resolved one is never edited) whose grad_accum_steps is what runs; it is
    the one the run saves, so the run dir's config.yaml says how the batch was made."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                        f"micro_batch_size {t.micro_batch_size} x world size {world_size} = {per_step}; "
                        "change one of them.")
    train = dataclasses.replace(t, grad_accum_steps=t.global_batch_size // per_step)
    return dataclasses.replace(cfg, train=train)


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
    check_data_budget(cfg, dist.world_size, verbose=dist.is_main)  # every dataset is prepared now: exact
    stages = cfg.to_dict()["data"]["stages"]  # plain dicts, as the loader takes them
    loader = PackedLoader({n: paths[n] for n in trained}, split="train", weights=trained,
                          stages=stages or None, batch_size=t.micro_batch_size, seq_len=t.seq_len, seed=t.seed,
                          rank=dist.rank, world_size=dist.world_size, grad_accum_steps=t.grad_accum_steps)
    return tokenizer, loader, paths  # paths: every dataset's held-out split, evaluation-only ones included


def setup_stream(cfg: Config, dist: DistEnv, layout: LocalLayout) -> tuple[Tokenizer, object, None]:
    """data.streaming: tokenize, mix and pack the sources on the fly, in data.num_workers processes per
    dataset; no prepare step, no held-out split."""
    from smoltrain.data.recipe import resolve_asset, resolve_tokenizer
    from smoltrain.data.stream import StreamLoader

    several = [d.name for d in cfg.data.datasets if len(d.sources) != 1]
    if several:
        raise UserError(f"data.streaming reads exactly one source per dataset (a directory or an hf: id may hold "
                        f"many files); {', '.join(several)} must name one. Give each source a dataset of its own "
                        "(their weights mix them), or prepare the data.")
    def resolve() -> tuple[Tokenizer, dict[str, str]]:
        return (resolve_tokenizer(cfg, verbose=dist.is_main),
                {d.name: resolve_asset(d.sources[0]) for d in cfg.data.datasets})

    tokenizer, sources = dist_io.main_first(resolve, layout.leads_dir)  # rank 0 fetches and trains first
    layout.check_same_data(tokenizer, {})
    t = cfg.train
    stages = cfg.to_dict()["data"]["stages"]  # plain dicts, as the loader takes them
    loader = StreamLoader(sources, tokenizer, t.micro_batch_size, t.seq_len, text_key=cfg.data.text_key,
                          rank=dist.rank, world_size=dist.world_size, seed=t.seed,
                          weights={d.name: d.weight for d in cfg.data.datasets}, stages=stages or None,
                          grad_accum_steps=t.grad_accum_steps, num_workers=cfg.data.num_workers)
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
