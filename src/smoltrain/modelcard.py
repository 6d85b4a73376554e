"""The parts of an exported model card (README.md) that say how the model was made and what it is for.

`interop.model_card` writes the architecture; this adds, for a training checkpoint, what its
train_state.json, config.yaml and its run's metrics.jsonl record: tokens seen, data, hyperparameters,
final losses and the loss curve (a PNG beside the card). Imported weights carry an origin.json (written by
`import`: the source, its name and whether it is a base or an instruction-tuned model, read from the
source's own metadata), so their card names where they came from and claims no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from smoltrain.history import History, plot_loss

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


def _data_lines(cfg: dict, tokens_per_source: dict) -> list[str]:
    data = cfg.get("data") or {}
    vocab = data.get("train_tokenizer_vocab_size") or 0
    tok = (f"a byte-level BPE with {vocab} tokens trained on the sources" if vocab > 0
           else f"`{data.get('tokenizer', 'unknown')}`")
    lines = [f"- tokenizer: {tok}"]
    for ds in data.get("datasets") or []:
        where = ", ".join(f"`{s}`" for s in ds.get("sources") or []) or f"`{ds.get('path', '')}` (prepared)"
        seen = tokens_per_source.get(ds.get("name"))
        seen = f", {seen:,} tokens seen" if isinstance(seen, int) else ""
        lines.append(f"- `{ds.get('name')}` (weight {ds.get('weight', 1.0):g}{seen}): {where}")
    return lines


def _hyperparameter_rows(cfg: dict, state: dict) -> list[str]:
    o, t = cfg.get("optim") or {}, cfg.get("train") or {}
    micro, accum, world = t.get("micro_batch_size"), t.get("grad_accum_steps"), state.get("world_size", 1)
    rows = [("optimizer", f"AdamW (betas {o.get('beta1')}, {o.get('beta2')}; eps {o.get('eps')}; "
                          f"weight decay {o.get('weight_decay')})"),
            ("learning rate", f"peak {o.get('lr')}, min {o.get('min_lr')}, schedule {o.get('schedule')} "
                              f"({o.get('decay_style')} decay), warmup {o.get('warmup_steps')} steps"),
            ("gradient clipping", o.get("grad_clip")),
            ("batch", f"{state.get('global_batch', '?')} sequences (micro {micro} x accum {accum} x world "
                      f"{world}) of {t.get('seq_len')} tokens"),
            ("steps", f"{state.get('step')} (of max_steps {t.get('max_steps')})"),
            ("precision / seed", f"{t.get('dtype')} / {t.get('seed')}")]
    return [f"| {k} | {v} |" for k, v in rows]


def _results_lines(history: History, out: Path | None) -> list[str]:
    last, val = history.last(), history.last(evals=True)
    lines = []
    if last:
        lines.append(f"- final training loss: {last['loss']:.4f} (step {last['step']})")
    if val:
        extra = "".join(f", {name} {val[key]:{spec}}" for name, key, spec in
                        (("perplexity", "val_ppl", ".2f"), ("bits per byte", "val_bpb", ".4f"))
                        if isinstance(val.get(key), (int, float)))
        lines.append(f"- final validation loss: {val['val_loss']:.4f}{extra} (step {val['step']})")
    if history.tasks:
        step = history.tasks[-1]["step"]
        for name, sc in history.task_scores().items():
            scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(sc.items()))
            lines.append(f"- downstream task `{name}` (zero-shot multiple choice, lm-eval's scoring): {scores} "
                         f"(step {step})")
    if out is not None and plot_loss(history, out / LOSS_PLOT) is not None:
        lines += ["", f"![training and validation loss]({LOSS_PLOT})"]
    return lines or ["- no losses were found (the run's metrics.jsonl is not beside this checkpoint)"]


def training_sections(src: Path, out: Path | None = None) -> str:
    """Markdown about how the checkpoint at `src` was trained; '' when it holds no train_state.json.

    With `out`, the loss curve of the run up to this checkpoint's step is written there as loss.png.
    """
    state = _read_json(src / "train_state.json")
    if state is None:
        return ""
    cfg = _read_yaml(src / "config.yaml")
    run_dir = src.parent.parent if src.parent.name == "checkpoints" else None
    step = state.get("step")
    history = History.load(run_dir, up_to_step=step) if run_dir and isinstance(step, int) else History()
    last = history.last() or {}
    env = state.get("env") or {}
    tokens = state.get("tokens_seen")
    init = (cfg.get("train") or {}).get("init_from")
    how = f"Continued pretraining of `{init}`" if init else "Pretrained from scratch"
    seen = f" on {tokens:,} tokens" if isinstance(tokens, int) else ""
    device = env.get("device_name") or env.get("device") or "an unknown device"
    if str(env.get("device", "")).startswith("cpu"):
        device = f"{device} (CPU, {env.get('cpu_threads', '?')} threads)"
    parts = ["## Training", "",
             f"{how} with smoltrain for {step} steps{seen}, on {env.get('world_size', 1)} x {device} "
             f"(smoltrain git {env.get('git_sha') or 'n/a'}).", "", "### Data", "",
             *_data_lines(cfg, last.get("tokens_per_source") or {}), "", "### Hyperparameters", "",
             "| setting | value |", "|---|---|", *_hyperparameter_rows(cfg, state), "", "### Results", "",
             *_results_lines(history, out), ""]
    return "\n".join(parts) + "\n"


def intended_use(trained_here: bool, origin: dict | None = None) -> str:
    """What the model is for and what it must not be trusted with (every card gets this)."""
    kind = (origin or {}).get("kind", "base")
    if trained_here:
        what = ("A base language model: it continues text. Its training with smoltrain is described above: it "
                "has seen no instruction, chat or safety tuning there.")
    elif origin is not None and kind == "instruct":
        what = (f"An instruction-tuned model imported from `{origin.get('source')}`: it was tuned by its makers to "
                "follow instructions in a chat format. Its training is not recorded in this export; see the card "
                "of the model it came from for its data, tuning and limits.")
    else:
        where = f" from `{origin.get('source')}`" if origin else ""
        what = (f"A base language model imported{where}: it continues text. Its training is not recorded in "
                "this export; see the card of the model it came from for its data and limits.")
    follow = ("It follows instructions only as far as its small size allows" if kind == "instruct" and not trained_here
              else "It does not follow instructions")
    losses = ("- The losses above measure fit to held-out text from the same data, not usefulness or safety.\n"
              if trained_here else "")
    return f"""## Intended use and limitations

{what} It is meant for research, teaching and as a starting point for further training.

- {follow} and will confidently produce false, repetitive or meaningless text; small models do so
  often. Do not use its output as facts.
- It reproduces the style, gaps and biases of its training data; check that data before any use where
  that matters, and do not use the model for decisions about people.
{losses}"""
