"""Configuration: documented dataclasses, YAML recipes, dotted `--set` overrides, strict validation.

Field names follow Hugging Face's LlamaConfig wherever one exists. Every problem in a config (unknown
key, wrong type, bad value, inconsistent sizes) is collected and reported in one UserError.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smoltrain.errors import UserError


@dataclass
class ModelConfig:
    """The SmolLM2 / Llama architecture (HF `LlamaConfig` names; defaults are SmolLM2-135M's)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.041666666666666664  # nanotron's init_method.std
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> list[str]:
        """All problems with this shape, as messages (empty when fine)."""
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name} must be positive (got {getattr(self, name)})")
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            problems.append(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                            f"model.num_attention_heads ({self.num_attention_heads})")
        elif self.num_attention_heads > 0 and self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even for RoPE")
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"model.num_key_value_heads ({self.num_key_value_heads})")
        return problems

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' LlamaForCausalLM loads."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
            head_dim=self.head_dim, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
            rope_scaling=None, pretraining_tp=1, use_cache=True, torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> ModelConfig:
        """Read a transformers Llama config dict; anything that is not plain SmolLM2/Llama is an error."""
        arch = hf.get("model_type")
        if arch != "llama":
            archs = hf.get("architectures") or []
            raise UserError(f"{source} describes a {arch or archs or 'unknown'} model; smoltrain handles "
                            "Llama/SmolLM2 models (model_type 'llama') only.")
        unsupported = []
        if hf.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={hf['hidden_act']}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                unsupported.append(f"{flag}=true")
        rope = hf.get("rope_scaling") or {}
        params = hf.get("rope_parameters") or {}
        if rope or params.get("rope_type", "default") != "default":
            unsupported.append(f"rope scaling {rope or params}")
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            unsupported.append(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads")
        if unsupported:
            raise UserError(f"{source} is a Llama variant smoltrain does not implement: {', '.join(unsupported)}.")
        theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
        kw = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        cfg = cls(**kw)
        problems = cfg.validate()
        if problems:
            raise UserError(f"{source} has an invalid shape: " + "; ".join(problems) + ".")
        return cfg


def eos_ids(cfg: ModelConfig) -> list[int]:
    """The end-of-sequence ids as a list (HF allows an int or a list)."""
    e = cfg.eos_token_id
    return [] if e is None else [e] if isinstance(e, int) else list(e)





@dataclass
class DatasetConfig:
    """One named dataset of the mixture: raw `sources` prepared (once) into `path`, or a prepared `path`."""

    name: str = "data"
    sources: list[str] = field(default_factory=list)  # files, dirs, hf:NAME[:CONFIG], assets:shakespeare
    path: str = ""  # prepared dir; default {run.data_dir}/{name}
    weight: float = 1.0


@dataclass
class DataConfig:
    tokenizer: str = "assets:smollm2"  # hub id, dir, tokenizer.json, .gguf, assets:smollm2
    train_tokenizer_vocab_size: int = 0  # > 0: train a byte-level BPE of this size on the sources first
    datasets: list[DatasetConfig] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # [{start_step: N, weights: {name: w}}] (nanotron)
    val_fraction: float = 0.01  # held-out documents per dataset
    text_key: str = "text"
    max_documents: int | None = None
    streaming: bool = False  # tokenize and pack on the fly from the sources, no prepare step
    num_proc: int = 0  # prepare workers; 0 = all cores


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 0.0  # floor reached at the end of the decay
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    schedule: str = "wsd"  # wsd | cosine | linear | constant
    warmup_steps: int = 0
    decay_start_step: int | None = None  # wsd: nanotron lr_decay_starting_step (default: 80% of max_steps)
    decay_steps: int | None = None  # wsd: nanotron lr_decay_steps (default: to max_steps)
    decay_style: str = "linear"  # wsd decay shape: linear | cosine | 1-sqrt
    no_decay_norms_and_embeddings: bool = True  # exclude 1-d norms and the (tied) embedding from weight decay
    eight_bit: bool = False  # bitsandbytes AdamW8bit (CUDA only)


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_size: int = 8
    seq_len: int = 256
    grad_accum_steps: int = 1
    global_batch_size: int | None = None  # sequences per step; sets grad_accum_steps = this / (micro x world)
    seed: int = 1337
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16 (with GradScaler)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    loss_chunk: int = 4096  # tokens per chunk of the fused head + cross-entropy; 0 = plain loss
    init_from: str | None = None  # continued pretraining: checkpoint, run dir, HF dir or .gguf
    allow_config_change: bool = False  # resume even if the trajectory-defining config differs
    resume_from: str | None = None  # explicit checkpoint to resume from (must exist)
    start_fresh: bool = False  # train from step 0 even though every checkpoint in run.dir is corrupt


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # keep the newest N checkpoints (0 keeps all)
    export_hf: bool = False  # also write a complete HF folder inside each checkpoint (hf/)
    min_free_gb: float = 0.0  # extra free space to demand beyond the checkpoint's own size


@dataclass
class LogConfig:
    every: int = 10
    progress: bool = True  # live progress bar
    tensorboard: bool = True
    wandb_project: str | None = None


@dataclass
class EvalConfig:
    every: int = 0  # validation loss every N steps (0: only at the end)
    max_batches: int = 20
    sample_every: int = 0  # generate from `prompts` every N steps (0: only at the end)
    prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50


@dataclass
class ParallelConfig:
    strategy: str = "auto"  # auto (ddp under torchrun, else single) | single | ddp | fsdp


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


CHOICES = {
    "optim.schedule": ("wsd", "cosine", "linear", "constant"),
    "optim.decay_style": ("linear", "cosine", "1-sqrt"),
    "train.dtype": ("auto", "fp32", "bf16", "fp16"),
    "parallel.strategy": ("auto", "single", "ddp", "fsdp"),
}


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from a dict, recording every unknown key and wrong type."""
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            known = ", ".join(sorted(hints))
            problems.append(f"unknown key {path!r} (known keys here: {known})")
            continue
        tp = hints[key]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, problems)
        elif inner is not None and dataclasses.is_dataclass(inner) and isinstance(value, list):
            kwargs[key] = [_build(inner, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        elif not _type_ok(value, tp):
            problems.append(f"{path} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        else:
            kwargs[key] = float(value) if tp is float or (tp == float | None and value is not None) else value
    return cls(**kwargs)


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
            out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
        except yaml.YAMLError:
            out.append((key.strip(), raw))
    return out


def config_from_dict(tree: dict, source: str = "config") -> Config:
    tree = dict(tree or {})
    problems: list[str] = []
    model = tree.get("model") or {}
    if isinstance(model, dict) and "preset" in model:
        from smoltrain.presets import PRESETS

        model = dict(model)
        name = model.pop("preset")
        if name not in PRESETS:
            problems.append(f"model.preset {name!r} is unknown (known: {', '.join(sorted(PRESETS))})")
        else:
            model = {**dataclasses.asdict(PRESETS[name]), **model}
        tree["model"] = model
    cfg = _build(Config, tree, "", problems)
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
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"Malformed YAML in {path}: {str(e).replace(chr(10), ' ')}") from None
        if not isinstance(tree, dict):
            raise UserError(f"Config file {path} must hold a mapping of sections, not {type(tree).__name__}.")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def validate(cfg: Config) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    p = cfg.model.validate()
    t, o = cfg.train, cfg.optim
    for name in ("max_steps", "micro_batch_size", "seq_len", "grad_accum_steps"):
        if getattr(t, name) < 1:
            p.append(f"train.{name} must be at least 1 (got {getattr(t, name)})")
    if t.seq_len > cfg.model.max_position_embeddings:
        p.append(f"train.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
                 f"({cfg.model.max_position_embeddings})")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            p.append(f"{key} must be one of {', '.join(allowed)} (got {value!r})")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        p.append(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr (got {o.lr}, {o.min_lr})")
    if o.warmup_steps < 0:
        p.append(f"optim.warmup_steps must be >= 0 (got {o.warmup_steps})")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0 or cfg.log.every < 1:
        p.append("checkpoint.every and checkpoint.keep_last must be >= 0 and log.every >= 1")
    names = [d.name for d in cfg.data.datasets]
    if len(set(names)) != len(names):
        p.append(f"data.datasets names must be unique (got {names})")
    for d in cfg.data.datasets:
        if not d.sources and not d.path:
            p.append(f"dataset {d.name!r} needs sources or a prepared path")
        if d.weight < 0:
            p.append(f"dataset {d.name!r} has a negative weight")
    if not 0 <= cfg.data.val_fraction < 1:
        p.append(f"data.val_fraction must be in [0, 1) (got {cfg.data.val_fraction})")
    return p


# Fields that define a run's trajectory: resuming with any of them changed is refused by default.
# The global batch (micro x accum x world) is compared by the trainer: 2 x 4 on one process equals 2 x 2 on two.
TRAJECTORY_FIELDS = ("model", "train.seq_len", "train.seed",
                     "data.datasets", "data.stages", "data.tokenizer", "data.train_tokenizer_vocab_size",
                     "data.val_fraction")


def _get(tree: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        tree = tree.get(k, {}) if isinstance(tree, dict) else {}
    return tree


def trajectory_diff(old: dict, new: dict) -> list[str]:
    """Trajectory-defining fields whose values differ between two resolved config dicts."""
    diffs = []
    for key in TRAJECTORY_FIELDS:
        a, b = _get(old, key), _get(new, key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs
