"""Configuration: documented dataclasses, YAML recipes, dotted `--set` overrides, strict validation.

Field names follow Hugging Face's LlamaConfig wherever one exists (the model section is modelconfig's
ModelConfig; `model.preset` reads presets.py). Every problem in a config (unknown key, wrong type, bad
value, inconsistent sizes) is collected and reported in one UserError: domain.build names unknown keys and
wrong types, each field's `checked` domain its bad values, and validate() below the cross-field rules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smoltrain.domain import (
    Domain,
    build,
    checked,
    device,
    interval,
    is_number,
    nonneg,
    one_of,
    positive,
    seed,
    temperature,
    top_p,
)
from smoltrain.domain import problems as domain_problems
from smoltrain.errors import UserError
from smoltrain.model.config import ModelConfig, SamplingConfig
from smoltrain.presets import PRESETS
from smoltrain.recipefile import parse_overrides, read_tree, set_dotted

SAMPLING = SamplingConfig()  # the shared sampling defaults (generate, demo, in-training samples)
EXTENSION = Domain(lambda v: isinstance(v, str) and re.fullmatch(r"\.[\w+-][\w.+-]*", v) is not None,
                   "a file extension with its dot, e.g. .md")


@dataclass
class DatasetConfig:
    """One named dataset of the mixture: raw `sources` prepared (once) into `path`, or a prepared `path`."""

    name: str = "data"
    sources: list[str] = field(default_factory=list)  # files, dirs, hf:NAME[:CONFIG], assets:shakespeare
    path: str = ""  # prepared dir; default {run.data_dir}/{name}
    weight: float = checked(1.0, nonneg())
    val_documents: list[str] = field(default_factory=list)  # globs of source-relative names to hold out
    # default data.val_fraction; 1.0: evaluation only (never trained on)
    val_fraction: float | None = checked(None, interval(0, 1, high_open=False))
    max_tokens: int | None = checked(None, positive)  # prepare stops reading past this many tokens (of both splits)

    def eval_only(self, default_fraction: float) -> bool:
        return not self.val_documents and self.held_out_fraction(default_fraction) == 1.0

    def held_out_fraction(self, default_fraction: float) -> float:
        return default_fraction if self.val_fraction is None else self.val_fraction


@dataclass
class StageConfig:
    """From `start_step` on, sample the datasets with these weights (nanotron's data stages)."""

    start_step: int = checked(0, nonneg())
    weights: dict[str, float] = field(default_factory=dict)  # dataset name -> weight


@dataclass
class DataConfig:
    tokenizer: str = "assets:smollm2"  # hub id, dir, tokenizer.json, .gguf, assets:smollm2
    # > 0: train a byte-level BPE of this size on the sources first
    train_tokenizer_vocab_size: int = checked(0, nonneg("use data.tokenizer as is"))
    datasets: list[DatasetConfig] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)  # [{start_step: N, weights: {name: w}}]
    val_fraction: float = checked(0.01, interval(0, 1))  # held-out documents per dataset
    # files read whole as one document each (.jsonl, .jsonl.gz and .parquet are always read by rows)
    text_extensions: list[str] = checked(default_factory=lambda: [".txt"], domain=EXTENSION)
    text_key: str = "text"
    max_documents: int | None = checked(None, positive)
    # tokens to prepare in all, shared by the trained datasets by weight (a dataset's own max_tokens wins)
    max_tokens: int | None = checked(None, positive)
    # passes over each dataset's training split a run may make; train refuses a recipe that needs more
    max_epochs: float = checked(1.0, positive)
    streaming: bool = False  # tokenize and pack on the fly from the sources, no prepare step
    # streaming: worker processes per dataset that tokenize ahead of the step (0: in the training process)
    num_workers: int = checked(1, nonneg("in the training process"))
    num_proc: int = checked(0, nonneg("all cores"))  # prepare workers


@dataclass
class OptimConfig:
    lr: float = checked(3e-3, positive)  # peak learning rate
    min_lr: float = checked(0.0, nonneg())  # floor reached at the end of the decay
    weight_decay: float = checked(0.01, nonneg())
    beta1: float = checked(0.9, interval(0, 1))
    beta2: float = checked(0.95, interval(0, 1))
    eps: float = checked(1e-8, positive)
    grad_clip: float = checked(1.0, nonneg("no clipping"))  # max global grad norm
    schedule: str = checked("wsd", one_of("wsd", "cosine", "linear", "constant"))
    warmup_steps: int = checked(0, nonneg())
    # wsd: nanotron lr_decay_starting_step (default: 80% of max_steps)
    decay_start_step: int | None = checked(None, nonneg())
    decay_steps: int | None = checked(None, positive)  # wsd: nanotron lr_decay_steps (default: to max_steps)
    decay_style: str = checked("linear", one_of("linear", "cosine", "1-sqrt"))  # wsd decay shape
    no_decay_norms_and_embeddings: bool = True  # exclude 1-d norms and the (tied) embedding from weight decay
    eight_bit: bool = False  # bitsandbytes AdamW8bit (CUDA only)
    # when a run is extended (train.max_steps raised on resume), ramp the LR up over this many steps
    rewarmup_steps: int = checked(0, nonneg("no re-warmup"))
    # muon: torch.optim.Muon (CpuMuon on CPU: fp32 Newton-Schulz) for the decoder's hidden matrices, AdamW
    # (the fields above) for the rest
    name: str = checked("adamw", one_of("adamw", "muon"))
    muon_lr: float = checked(0.02, positive)  # peak lr of the hidden matrices; the schedule scales it like lr
    muon_momentum: float = checked(0.95, interval(0, 1))  # Nesterov momentum of the hidden matrices
    muon_weight_decay: float = checked(0.0, nonneg())  # decoupled, times the muon lr
    # per-shape lr scale: original (Keller Jordan: sqrt(max(1, rows/cols))) | match_rms_adamw (Moonshot)
    muon_adjust_lr: str = checked("original", one_of("original", "match_rms_adamw"))


@dataclass
class TrainConfig:
    max_steps: int = checked(100, positive)
    micro_batch_size: int = checked(8, positive)
    seq_len: int = checked(256, positive)
    grad_accum_steps: int = checked(1, positive)
    # sequences per step; sets grad_accum_steps = this / (micro x world)
    global_batch_size: int | None = checked(None, positive)
    seed: int = checked(1337, seed)
    device: str = checked("auto", device)  # auto (cuda > mps > cpu) | cpu | cuda | mps
    # auto: bf16 on CUDA, fp32 elsewhere; fp16 trains with a GradScaler
    dtype: str = checked("auto", one_of("auto", "fp32", "bf16", "fp16"))
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    # tokens per chunk of the fused head + cross-entropy; auto: chosen for shape and device; 0: plain loss
    loss_chunk: int | str = checked("auto", Domain(lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
                                                   "'auto' or an integer >= 0 (0: plain loss)"))
    init_from: str | None = None  # continued pretraining: checkpoint, run dir, HF dir or .gguf
    allow_config_change: bool = False  # resume even if the trajectory-defining config differs
    resume_from: str | None = None  # explicit checkpoint to resume from (must exist)
    start_fresh: bool = False  # train from step 0 even though every checkpoint in run.dir is corrupt


@dataclass
class CheckpointConfig:
    every: int = checked(0, nonneg("only at the end"))  # save every N steps
    keep_last: int = checked(3, nonneg("keep all"))  # keep the newest N checkpoints
    export_hf: bool = False  # also write a complete HF folder inside each checkpoint (hf/)
    min_free_gb: float = checked(0.0, nonneg())  # extra free space to demand beyond the checkpoint's own size
    remote: str | None = None  # fsspec URL (s3://bucket/prefix, gs://..., file:///dir): mirror + resume from it
    remote_options: dict = field(default_factory=dict)  # fsspec storage options (endpoint_url, key, secret, ...)
    remote_timeout: float = checked(600.0, positive)  # seconds the end of a run (or a signal) waits for the upload
    push_to_hub: str | None = None  # HF repo id: push each checkpoint's export to branch step_NNNNNNNN
    hub_private: bool = False  # create the push_to_hub repo as private


@dataclass
class LogConfig:
    every: int = checked(10, positive)
    progress: bool = True  # live progress bar
    tensorboard: bool = True
    wandb_project: str | None = None  # wandb (online, or WANDB_MODE=offline): one wandb run per run dir
    trackio_project: str | None = None  # trackio: local-first tracker (SQLite), `trackio show` to browse


@dataclass
class EvalConfig:
    every: int = checked(0, nonneg("only at the end"))  # validation loss every N steps
    # tokens per dataset: null evaluates the whole held-out split, N a fixed sample spread over it
    max_tokens: int | None = checked(None, positive)
    sample_every: int = checked(0, nonneg("only at the end"))  # generate from `prompts` every N steps
    prompts: list[str] = field(default_factory=list)
    sample_tokens: int = checked(48, nonneg("no samples"))
    temperature: float = checked(SAMPLING.temperature, temperature)  # defaults: model.config.SamplingConfig's
    top_k: int = checked(SAMPLING.top_k, nonneg("off"))
    top_p: float = checked(SAMPLING.top_p, top_p)
    # multiple-choice tasks scored at every evaluation: JSONL files, lm-eval suite names (hellaswag, ...), or
    # next-line:DATASET (pick the true next line of four, built from that dataset's held-out split)
    tasks: list[str] = field(default_factory=list)
    tasks_limit: int = checked(200, positive)  # items per task at each evaluation (cheap by default)


@dataclass
class ParallelConfig:
    # auto: ddp under torchrun, else single
    strategy: str = checked("auto", one_of("auto", "single", "ddp", "fsdp"))


@dataclass
class RunConfig:
    dir: str = "runs/default"
    data_dir: str = ""  # prepared data and trained tokenizers; default {dir}/data


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def data_dir(self) -> Path:
        return Path(self.run.data_dir) if self.run.data_dir else Path(self.run.dir) / "data"


def config_keys(section: str | None = None) -> list[tuple[str, str, str]]:
    """(dotted key, type and allowed values, default) for every config key: `smoltrain config keys`."""
    sections = [f for f in dataclasses.fields(Config) if section is None or f.name == section]
    if not sections:
        known = ", ".join(f.name for f in dataclasses.fields(Config))
        raise UserError(f"No config section {section!r} (sections: {known}).")
    rows: list[tuple[str, str, str]] = []
    for f in sections:
        rows += _keys_of(f.type if isinstance(f.type, type) else type(getattr(Config(), f.name)), f.name)
    return rows


def _keys_of(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    import typing

    from smoltrain.domain import expected

    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if inner is not None and dataclasses.is_dataclass(inner):
            rows += _keys_of(inner, f"{prefix}.{f.name}[]")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}.{f.name}", expected(tp, f.metadata.get("domain")), yaml.safe_dump(
            default, default_flow_style=True, width=1000).strip().removesuffix("...").strip()))
    return rows


Check = Callable[["Config"], list[str]]
OWN_VAL_FRACTION = 0.1  # `--data`: every 10th document held out (a folder of notes has few documents)


@dataclass(frozen=True)
class OwnTexts:
    """`smoltrain train --data PATH... [--data-ext .md,.py]`: train on these files instead of the recipe's
    datasets (litgpt's TextFiles): one dataset, a BPE trained on it when the recipe trains one."""

    paths: tuple[str, ...]
    extensions: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The dataset's name: the first path's folder or file stem, in characters safe for a directory."""
        first = Path(self.paths[0]).expanduser()
        stem = first.resolve().name if first.is_dir() else first.name.split(".")[0]
        return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "texts"


def use_own_texts(tree: dict, own: OwnTexts, overridden: set[str]) -> list[str]:
    """Replace the recipe's datasets with `own`'s and drop what named the old ones; the changes, as phrases.

    The run goes to runs/NAME (unless --set run.dir is given), so it never resumes the recipe's own run."""
    data = tree.setdefault("data", {})
    if not isinstance(data, dict):
        return []  # build() names the malformed section
    name = own.name
    old = [str(d.get("name", "data")) for d in data.get("datasets") or [] if isinstance(d, dict)]
    data["datasets"] = [{"name": name, "sources": list(own.paths), "val_fraction": OWN_VAL_FRACTION}]
    notes = [f"data.datasets [{', '.join(old)}] -> [{name}: {', '.join(own.paths)}] (every "
             f"{round(1 / OWN_VAL_FRACTION)}th document held out)"]
    if own.extensions:
        data["text_extensions"] = list(own.extensions)
        notes.append(f"data.text_extensions [{', '.join(own.extensions)}]")
    if data.pop("stages", None):
        notes.append("data.stages dropped (they weighted the replaced datasets)")
    ev = tree.get("eval")
    tasks = ev.get("tasks") if isinstance(ev, dict) else None
    gone = [t for t in tasks or [] if isinstance(t, str) and t.startswith("next-line:")]
    if gone:
        ev["tasks"] = [t for t in tasks if t not in gone]
        notes.append(f"eval.tasks {', '.join(gone)} dropped (built from the replaced dataset; "
                     f"--set 'eval.tasks=[next-line:{name}]' scores yours)")
    run = tree.setdefault("run", {})
    if "run.dir" not in overridden and isinstance(run, dict):
        notes.append(f"run.dir {run.get('dir', RunConfig.dir)} -> runs/{name}")
        run["dir"] = f"runs/{name}"
    return notes


def config_from_dict(tree: dict, source: str = "config", checks: Iterable[Check] = ()) -> Config:
    """Build and validate; `checks` (e.g. the trainer's input checks: paths, tokenizer size) add their
    problems to the same message, so a user sees every mistake in one run."""
    tree = dict(tree or {})
    problems: list[str] = []
    model = tree.get("model") or {}
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        if name not in PRESETS:
            problems.append(f"model.preset {name!r} is unknown (known: {', '.join(sorted(PRESETS))})")
        else:
            model = {**dataclasses.asdict(PRESETS[name]), **model}
        tree["model"] = model
    cfg = build(Config, tree, "", problems)
    problems += validate(cfg)  # fields with a wrong type kept their defaults: safe to check the rest
    for check in checks:
        problems += check(cfg)
    if problems:
        raise UserError(f"Invalid configuration in {source}: " + "; ".join(problems) + ".")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None, own: OwnTexts | None = None,
                checks: Iterable[Check] = (), notes: list[str] | None = None) -> Config:
    """Read a YAML recipe (or defaults when path is None), apply `own` texts (`--data`) and then the
    `--set` overrides, validate; what `own` changed is appended to `notes`."""
    tree = read_tree(path)
    pairs = parse_overrides(overrides or [])
    if own is not None:
        changed = use_own_texts(tree, own, {key for key, _ in pairs})
        if notes is not None:
            notes += changed
    for key, value in pairs:
        set_dotted(tree, key, value)
    return config_from_dict(tree, "defaults" if path is None else str(path), checks)


def validate(cfg: Config) -> list[str]:
    """Every field's domain (declared with `checked` on the dataclasses), then cross-field checks."""
    p = cfg.model.validate()
    p += _fits_in_memory(cfg.model) if not p else []
    for section in dataclasses.fields(cfg):
        if section.name != "model":
            p += domain_problems(getattr(cfg, section.name), section.name)
    t = cfg.train
    o = cfg.optim
    if t.seq_len > cfg.model.max_position_embeddings:
        p.append(f"train.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
                 f"({cfg.model.max_position_embeddings})")
    if o.min_lr > o.lr:
        p.append(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    if o.name == "muon" and o.eight_bit:
        p.append("optim.eight_bit is AdamW8bit and cannot be combined with optim.name=muon")
    names = [d.name for d in cfg.data.datasets]
    if len(set(names)) != len(names):
        p.append(f"data.datasets names must be unique (got {names})")
    for d in cfg.data.datasets:
        if not d.sources and not d.path:
            p.append(f"dataset {d.name!r} needs sources or a prepared path")
        if d.val_documents and d.val_fraction is not None:
            p.append(f"dataset {d.name!r}: give val_documents or val_fraction, not both")
        if d.val_documents and not d.sources:
            p.append(f"dataset {d.name!r}: val_documents needs sources (a prepared path is already split)")
        if any(not g for g in d.val_documents):
            p.append(f"dataset {d.name!r}: val_documents holds an empty glob")
    trained = [d for d in cfg.data.datasets if not d.eval_only(cfg.data.val_fraction)]
    if cfg.data.datasets and not trained:
        p.append("every dataset is evaluation-only (val_fraction 1.0): at least one must be trained on")
    elif trained and not 0 < _total([d.weight for d in trained]) < math.inf:
        p.append("the trained datasets' weights must sum to a positive finite number (all 0, or too large)")
    p += _stage_problems(cfg.data.stages, names)
    p += _tokenizer_problems(cfg)
    for spec in cfg.eval.tasks:
        if spec.startswith("next-line:") and spec.split(":", 1)[1] not in names:
            p.append(f"eval.tasks {spec!r} names no dataset (datasets: {', '.join(names) or 'none'})")
    if cfg.checkpoint.remote:
        p += check_remote_url(cfg.checkpoint.remote)
        p += _remote_overlaps(cfg)
    if not str(cfg.run.dir).strip():
        p.append("run.dir is empty (it would train into the current directory); name a run directory")
    if any(not isinstance(q, str) or not q.strip() for q in cfg.eval.prompts):
        p.append("eval.prompts holds an empty prompt (sampling needs some text to continue)")
    return p


def _remote_overlaps(cfg: Config) -> list[str]:
    """A file:// store may not lie in or around the run dir, the data dir or any input: its uploads and
    retention delete what they find there (a store at the run dir deleted each new checkpoint's manifest)."""
    scheme, _, rest = cfg.checkpoint.remote.partition("://")
    if scheme not in ("file", "local"):
        return []
    store = Path(rest).expanduser().resolve()
    places = [("run.dir", cfg.run.dir), ("run.data_dir", str(cfg.data_dir)), ("train.init_from", cfg.train.init_from),
              ("train.resume_from", cfg.train.resume_from), ("data.tokenizer", cfg.data.tokenizer)]
    for ds in cfg.data.datasets:
        places += [(f"data.datasets[{ds.name}].path", ds.path)]
        places += [(f"data.datasets[{ds.name}].sources", src) for src in ds.sources]
    places += [("eval.tasks", t) for t in cfg.eval.tasks]
    for key, value in places:
        if not value or not isinstance(value, str) or ":" in value.split("/", 1)[0]:  # hf:, assets:, URLs
            continue
        where = Path(value).expanduser().resolve()
        if where == store or store in where.parents or where in store.parents:
            return [f"checkpoint.remote {cfg.checkpoint.remote} overlaps {key} {value}: the store's uploads and "
                    "retention delete files there; give the store a directory of its own"]
    return []
def _tokenizer_problems(cfg: Config) -> list[str]:
    """A tokenizer to train needs texts to train on and must fit the model; each message names the fix."""
    d = cfg.data
    size = d.train_tokenizer_vocab_size
    p = []
    if size > 0 and d.datasets and not any(ds.sources and not ds.eval_only(d.val_fraction) for ds in d.datasets):
        p.append(f"data.train_tokenizer_vocab_size {size} trains a tokenizer on the datasets' sources, but no "
                 "dataset has sources to train on; give a dataset sources, or set data.train_tokenizer_vocab_size: "
                 f"0 (off) to use data.tokenizer ({d.tokenizer}) as is")
    if size > cfg.model.vocab_size:
        p.append(f"data.train_tokenizer_vocab_size ({size}) exceeds model.vocab_size ({cfg.model.vocab_size}); "
                 f"set data.train_tokenizer_vocab_size: {cfg.model.vocab_size}, or raise model.vocab_size to {size}")
    return p


def _stage_problems(stages: list[StageConfig], names: list[str]) -> list[str]:
    """Stage weights name known datasets with finite non-negative numbers; start steps increase."""
    p = []
    for i, st in enumerate(stages):
        where = f"data.stages[{i}]"
        if not st.weights:
            p.append(f"{where}.weights is required (a mapping of dataset name to weight)")
        unknown = sorted(set(st.weights) - set(names)) if names else []
        if unknown:
            p.append(f"{where}.weights names unknown dataset(s) {', '.join(map(str, unknown))} "
                     f"(datasets: {', '.join(names)})")
        bad = {k: w for k, w in st.weights.items() if not is_number(w) or not math.isfinite(w) or w < 0}
        if bad:
            p.append(f"{where}.weights must be finite numbers >= 0 (got {bad})")
        elif st.weights and not 0 < _total(list(st.weights.values())) < math.inf:
            p.append(f"{where}.weights must sum to a positive finite number (all 0, or too large)")
        if i and st.start_step <= stages[i - 1].start_step:
            p.append(f"{where}.start_step ({st.start_step}) must be greater than the previous stage's")
    return p


def _fits_in_memory(m: ModelConfig) -> list[str]:
    """A shape whose fp32 weights alone exceed this machine's memory cannot even be built: say so now
    rather than let the allocation fail (a traceback) after the data was prepared."""
    kv = m.num_key_value_heads * m.head_dim
    layer = 2 * m.hidden_size * m.hidden_size + 2 * m.hidden_size * kv + 3 * m.hidden_size * m.intermediate_size
    params = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2) + m.num_hidden_layers * layer
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return []
    if params * 4 <= memory:
        return []
    return [f"model sizes give {params:,} parameters ({params * 4 / 2**30:,.1f} GiB in fp32), more than this "
            f"machine's {memory / 2**30:,.1f} GiB of memory"]


def _total(weights: list) -> float:
    """Sum of the valid weights (the others are reported on their own); inf when it overflows."""
    return sum(float(w) for w in weights if is_number(w) and math.isfinite(w) and w >= 0)


def check_remote_url(url: str) -> list[str]:
    """Syntax problems of a checkpoint.remote URL (config resolve time: no network)."""
    import fsspec

    if "://" not in url:
        return [f"checkpoint.remote must be a URL with a scheme (s3://bucket/prefix, gs://..., file:///abs/dir), "
                f"got {url!r}"]
    scheme, rest = url.split("://", 1)
    if scheme not in fsspec.available_protocols():
        return [f"checkpoint.remote {url!r}: unknown storage scheme {scheme!r} (fsspec knows s3, gs, file, ...)"]
    if scheme not in ("file", "local") and not rest.split("/", 1)[0]:
        return [f"checkpoint.remote {url!r} names no bucket (s3://BUCKET/prefix)"]
    return []
