"""The model card (README.md) of an exported HF directory: what the model is, how it was made, what it is for.

The card is templates/model_card.md.j2; this module gathers its values. For a training checkpoint those
are what its train_state.json, config.yaml and its run's metrics.jsonl record: tokens seen, data,
hyperparameters, final losses and the loss curve (a PNG beside the card). Imported weights carry an origin.json (written by
`import`: the source, its name and whether it is a base or an instruction-tuned model, read from the
source's own metadata), so their card names where they came from and claims no training.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, Template

from smoltrain.history import History, plot_loss
from smoltrain.model.config import ModelConfig

LOSS_PLOT = "loss.png"
ORIGIN = "origin.json"
INSTRUCT_WORDS = ("instruct", "chat", "-it", "_it", "sft", "dpo", "rlhf")


def model_kind(names: list[str], has_chat_template: bool) -> str:
    """'instruct' when the source's names or a chat template say so, else 'base'.

    SmolLM2's own files name the tuned models "-Instruct"; a chat template in the tokenizer is the other
    sign a model was tuned for conversations (base SmolLM2 ships none).
    """
    text = " ".join(n.lower() for n in names if n)
    if has_chat_template or any(w in text for w in INSTRUCT_WORDS):
        return "instruct"
    return "base"


def read_origin(src: Path) -> dict | None:
    """The origin.json of an imported checkpoint, or None for a checkpoint trained here."""
    return _read_json(Path(src) / ORIGIN)


def card_title(src: Path) -> str:
    """The model's name: the source's name for imports, the run's name and step for training checkpoints."""
    origin = read_origin(src)
    if origin and origin.get("name"):
        return str(origin["name"])
    state = _read_json(Path(src) / "train_state.json")
    if state is not None and Path(src).parent.name == "checkpoints":
        return f"{Path(src).parent.parent.name} (step {state.get('step')})"
    return Path(src).name


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def model_card(cfg: ModelConfig, src: Path, out: Path | None = None) -> str:
    """README.md for an HF folder; a training checkpoint's card adds its training (loss plot into `out`)."""
    src = Path(src)
    training = training_facts(src, out)
    values = {
        "title": card_title(src),
        "src": str(src),
        "arch": _architecture(cfg),
        "training": training,
        "use": _use_facts(training is not None, read_origin(src)),
    }
    return _template("model_card.md.j2").render(values)


def intended_use(trained_here: bool, origin: dict | None = None) -> str:
    """What the model is for and what it must not be trusted with (every card gets this section)."""
    return _template("_intended_use.md.j2").render(use=_use_facts(trained_here, origin))


@cache
def _environment() -> Environment:
    """Markdown templates: never HTML-escaped (a card must say `&`, not `&amp;`); a missing value fails loudly."""
    return Environment(loader=PackageLoader("smoltrain", "templates"), autoescape=False, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _template(name: str) -> Template:
    return _environment().get_template(name)


def render(name: str, values: dict) -> str:
    """One of smoltrain/templates rendered with `values` (Markdown rules: no escaping, missing values fail)."""
    return _template(name).render(values)


def _architecture(cfg: ModelConfig) -> dict:
    from smoltrain.model.llama import SmolLM2

    with torch.device("meta"):
        num_params = SmolLM2(cfg).num_params()
    fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings")
    arch = {name: getattr(cfg, name) for name in fields}
    arch["parameters"] = f"{num_params:,}"
    arch["rope_theta"] = f"{cfg.rope_theta:g}"
    return arch


def _use_facts(trained_here: bool, origin: dict | None) -> dict:
    """Which limits apply: trained here, or imported (base or instruction-tuned, from where)."""
    kind = (origin or {}).get("kind", "base")
    return {
        "trained_here": trained_here,
        "instruct": kind == "instruct" and not trained_here,
        "imported": origin is not None,
        "source": str((origin or {}).get("source")),
    }


def training_facts(src: Path, out: Path | None = None) -> dict | None:
    """How the checkpoint at `src` was trained; None when it holds no train_state.json.

    With `out`, the loss curve of the run up to this checkpoint's step is written there as loss.png.
    """
    state = _read_json(src / "train_state.json")
    if state is None:
        return None
    cfg = _read_yaml(src / "config.yaml")
    run_dir = src.parent.parent if src.parent.name == "checkpoints" else None
    step = state.get("step")
    history = History.load(run_dir, up_to_step=step) if run_dir and isinstance(step, int) else History()
    last = history.last() or {}
    env = state.get("env") or {}
    tokens = state.get("tokens_seen")
    init = (cfg.get("train") or {}).get("init_from")
    loss_plot = out is not None and plot_loss(history, out / LOSS_PLOT) is not None
    results = _results(history)
    if not results and not loss_plot:
        results = ["no losses were found (the run's metrics.jsonl is not beside this checkpoint)"]
    return {
        "how": f"Continued pretraining of `{init}`" if init else "Pretrained from scratch",
        "step": step,
        "seen": f" on {tokens:,} tokens" if isinstance(tokens, int) else "",
        "world_size": env.get("world_size", 1),
        "device": _device(env),
        "git_sha": env.get("git_sha") or "n/a",
        "tokenizer": _tokenizer(cfg.get("data") or {}),
        "datasets": _datasets(cfg.get("data") or {}, last.get("tokens_per_source") or {}),
        "hyperparameters": _hyperparameters(cfg, state),
        "results": results,
        "loss_plot": LOSS_PLOT if loss_plot else "",
    }


def _device(env: dict) -> str:
    device = env.get("device_name") or env.get("device") or "an unknown device"
    if str(env.get("device", "")).startswith("cpu"):
        return f"{device} (CPU, {env.get('cpu_threads', '?')} threads)"
    return device


def _tokenizer(data: dict) -> str:
    vocab = data.get("train_tokenizer_vocab_size") or 0
    if vocab > 0:
        return f"a byte-level BPE with {vocab} tokens trained on the sources"
    return f"`{data.get('tokenizer', 'unknown')}`"


def _datasets(data: dict, tokens_per_source: dict) -> list[dict]:
    rows = []
    for ds in data.get("datasets") or []:
        where = ", ".join(f"`{s}`" for s in ds.get("sources") or []) or f"`{ds.get('path', '')}` (prepared)"
        seen = tokens_per_source.get(ds.get("name"))
        rows.append({
            "name": ds.get("name"),
            "weight": f"{ds.get('weight', 1.0):g}",
            "seen": f", {seen:,} tokens seen" if isinstance(seen, int) else "",
            "where": where,
        })
    return rows


def optimizer_line(o: dict) -> str:
    """The optimizer that ran, read from the saved config's optim section (train.optim.build_optimizer's
    choice): AdamW, bitsandbytes AdamW8bit, or Muon for the hidden matrices beside AdamW for the rest."""
    kind = "AdamW8bit (bitsandbytes)" if o.get("eight_bit") else "AdamW"
    adamw = f"betas {o.get('beta1')}, {o.get('beta2')}; eps {o.get('eps')}; weight decay {o.get('weight_decay')}"
    if o.get("name", "adamw") != "muon":
        return f"{kind} ({adamw})"
    return (f"Muon for the decoder's hidden matrices (peak lr {o.get('muon_lr')}, Nesterov momentum "
            f"{o.get('muon_momentum')}, weight decay {o.get('muon_weight_decay')}, lr adjustment "
            f"{o.get('muon_adjust_lr')}) + AdamW for the embedding and norms (peak lr {o.get('lr')}; {adamw})")


def _hyperparameters(cfg: dict, state: dict) -> list[tuple[str, object]]:
    o = cfg.get("optim") or {}
    t = cfg.get("train") or {}
    batch = (f"{state.get('global_batch', '?')} sequences (micro {t.get('micro_batch_size')} x accum "
             f"{t.get('grad_accum_steps')} x world {state.get('world_size', 1)}) of {t.get('seq_len')} tokens")
    return [("optimizer", optimizer_line(o)),
            ("learning rate", f"peak {o.get('lr')}, min {o.get('min_lr')}, schedule {o.get('schedule')} "
                              f"({o.get('decay_style')} decay), warmup {o.get('warmup_steps')} steps"),
            ("gradient clipping", o.get("grad_clip")),
            ("batch", batch),
            ("steps", f"{state.get('step')} (of max_steps {t.get('max_steps')})"),
            ("precision / seed", f"{t.get('dtype')} / {t.get('seed')}")]


def _results(history: History) -> list[str]:
    """The final losses and task scores, one list item each."""
    last = history.last()
    val = history.last(evals=True)
    items = []
    if last:
        items.append(f"final training loss: {last['loss']:.4f} (step {last['step']})")
    if val:
        extra = "".join(f", {name} {val[key]:{spec}}" for name, key, spec in
                        (("perplexity", "val_ppl", ".2f"), ("bits per byte", "val_bpb", ".4f"))
                        if isinstance(val.get(key), (int, float)))
        items.append(f"final validation loss: {val['val_loss']:.4f}{extra} (step {val['step']})")
    if history.tasks:
        step = history.tasks[-1]["step"]
        for name, sc in history.task_scores().items():
            scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(sc.items()))
            items.append(f"downstream task `{name}` (zero-shot multiple choice, lm-eval's scoring): {scores} "
                         f"(step {step})")
    return items
