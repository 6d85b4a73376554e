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
from smoltrain.model.config import ModelConfig
from smoltrain.presets import PRESETS


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
    # muon: torch.optim.Muon for the decoder's hidden matrices, AdamW (the fields above) for the rest
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
    temperature: float = checked(0.8, temperature)
    top_k: int = checked(50, nonneg("off"))
    top_p: float = checked(1.0, top_p)
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


def get_dotted(tree: dict, dotted: str, default: Any = None) -> Any:
    """tree["optim"]["lr"] for "optim.lr"; `default` when a key is missing or a section is not a mapping."""
    node: Any = tree
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def flatten_dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists (datasets, stages) stay whole values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
MAX_CONFIG_CHARS = 1 << 20  # a recipe is a few KiB; this bounds what parsing it can cost


class AliasError(yaml.YAMLError):
    """A YAML alias: refused (never read as a plain string, as other unparsable --set values are)."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a 1 KB "billion laughs" file expands them without bound, and a recipe
    has no need for them (--set and presets are how values are shared)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasError(f"YAML aliases (*{event.anchor}) are not accepted in a smoltrain config "
                                 f"({event.start_mark}); write the value out")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """yaml.safe_load without aliases (bounded: the result is no larger than the text)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects KEY=VALUE (e.g. train.max_steps=100), got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out.append((key.strip(), load_yaml(raw) if raw.strip() else ""))
        except AliasError as e:
            raise UserError(f"--set {key.strip()}: {e}.") from None
        except yaml.YAMLError:
            out.append((key.strip(), raw))
    return out


def config_from_dict(tree: dict, source: str = "config") -> Config:
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
    if problems:
        raise UserError(f"Invalid configuration in {source}: " + "; ".join(problems) + ".")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or defaults when path is None), apply `--set` overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"Cannot read config file {path}: {e.strerror}.") from None
        except UnicodeDecodeError as e:
            raise UserError(f"Config file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
        if len(text) > MAX_CONFIG_CHARS:
            raise UserError(f"Config file {path} is {len(text):,} characters; a recipe is a few KiB (the limit is "
                            f"{MAX_CONFIG_CHARS:,}). Is it the right file?")
        try:
            tree = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"Malformed YAML in {path}: {str(e).replace(chr(10), ' ')}") from None
        if not isinstance(tree, dict):
            raise UserError(f"Config file {path} must hold a mapping of sections, not {type(tree).__name__}.")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


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
    if cfg.data.train_tokenizer_vocab_size > cfg.model.vocab_size:
        p.append(f"data.train_tokenizer_vocab_size ({cfg.data.train_tokenizer_vocab_size}) exceeds model.vocab_size "
                 f"({cfg.model.vocab_size}): token ids would index past the embedding")
    p += _stage_problems(cfg.data.stages, names)
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
