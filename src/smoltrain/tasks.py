"""Zero-shot multiple-choice tasks scored by log-likelihood, the way lm-evaluation-harness scores them.

An item is a context and a few choices; the model's log-probability of each choice given the context
picks its answer. The conventions are lm-eval's, so the numbers compare with published ones:
- `encode_pair` is lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation,
  and the continuation's tokens are tokens(context + continuation) minus the first len(tokens(context));
  an empty context is conditioned on the tokenizer's BOS token, else its EOS (lm-eval's prefix token);
- `acc` is argmax of the summed log-probs; `acc_norm` is argmax of log-prob / len(choice) in characters;
  ties go to the first choice (numpy's argmax).

Tasks come from JSONL files (`{"context": str, "choices": [str, ...], "label": int}` a line: the choice
is the continuation as written) or from lm-eval's own task definitions by name (hellaswag, arc_easy, ...),
whose prompts, delimiters and labels are taken from lm-eval unchanged; only the scoring is ours.

Scoring shares each context: our models prefill it once into a KV cache and score all its choices in one
batched forward after it, so a 4-choice item costs about one context and four choices, not four contexts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smoltrain.errors import UserError
from smoltrain.tokenizer import Tokenizer

SUITES = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "commonsense_qa", "mmlu")
HUB_HOST = "huggingface.co"


@dataclass
class Item:
    """One question: a (context, continuation) request per choice, the acc_norm lengths and the answer."""

    requests: list[tuple[str, str]]
    norm_lengths: list[int]  # characters of each choice (lm-eval's completion_len)
    label: int


@dataclass
class Task:
    name: str
    items: list[Item]


# --- loading ---------------------------------------------------------------------------------------
def _item_from_line(obj, where: str) -> Item:
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a JSON object; each line must be "
                        '{"context": str, "choices": [str, ...], "label": int}.')
    missing = [k for k in ("context", "choices", "label") if k not in obj]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}; each line must be "
                        '{"context": str, "choices": [str, ...], "label": int}.')
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(context, str):
        raise UserError(f"{where}: context must be a string, got {type(context).__name__}.")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: choices must be a list of at least two non-empty strings, got {choices!r}.")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise UserError(f"{where}: label must be an integer index into the {len(choices)} choices, got {label!r}.")
    return Item([(context, c) for c in choices], [len(c) for c in choices], label)


def load_jsonl_task(path: str | Path, limit: int | None = None) -> Task:
    """A task file, one item a line; any bad line is an error naming it, before anything is scored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read task file {path}: {e}.") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where} is not valid JSON ({e}).") from None
        items.append(_item_from_line(obj, where))
    if not items:
        raise UserError(f"Task file {path} holds no items.")
    return Task(path.stem, items[:limit] if limit else items)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect: without it, datasets retries for half a minute before failing."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline() -> None:
    """Let datasets and the hub client read their caches without trying (and retrying) the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            setattr(mod, attr, True)


def _items_from_lm_eval(task, limit: int | None) -> list[Item]:
    """Our items from an lm-eval ConfigurableTask: its zero-shot requests, choices and gold, unchanged."""
    if task.OUTPUT_TYPE != "multiple_choice":
        raise UserError(f"lm-eval task {task.config.task} is {task.OUTPUT_TYPE}, not multiple choice.")
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    items = []
    for insts in by_doc.values():
        insts.sort(key=lambda i: i.idx)
        doc = insts[0].doc
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold) if gold in choices else -1
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise UserError(f"lm-eval task {task.config.task}: a document's answer {gold!r} is not one choice.")
        items.append(Item([tuple(i.args) for i in insts[: len(choices)]], [len(c) for c in choices], gold))
    return items


def load_suite(name: str, limit: int | None = None) -> Task:
    """A standard suite by lm-eval's name (a group such as mmlu: all its subtasks, `limit` each)."""
    if not hub_reachable():
        _go_offline()
    from lm_eval.tasks import TaskManager

    try:
        leaves = list(TaskManager().load([name])["tasks"].values())
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        raise UserError(f"Could not load the {name!r} task through lm-eval (the Hugging Face hub is not "
                        f"reachable from here and the dataset is not cached: {type(e).__name__}: {e}). "
                        "Score a local JSONL task file instead (--tasks FILE.jsonl, one "
                        '{"context", "choices", "label"} object a line).') from None
    items = []
    for task in leaves:
        items += _items_from_lm_eval(task, limit)
    return Task(name, items)


def load_task(spec: str, limit: int | None = None) -> Task:
    """A JSONL file by path, else a standard suite by name."""
    if Path(spec).exists() or spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise UserError(f"Task file {spec} does not exist.")
        return load_jsonl_task(spec, limit)
    if spec not in SUITES:
        raise UserError(f"Unknown task {spec!r}: give a JSONL file or one of {', '.join(SUITES)}.")
    return load_suite(spec, limit)


def parse_task_specs(specs: Iterable[str]) -> list[str]:
    """`--tasks a,b --tasks c,a` -> [a, b, c]."""
    out = list(dict.fromkeys(s.strip() for spec in specs for s in spec.split(",") if s.strip()))
    if not out:
        raise UserError("--tasks needs at least one task file or name.")
    return out


# --- encoding (lm-eval's conventions) --------------------------------------------------------------
def prefix_token_id(tok: Tokenizer) -> int:
    """What an empty context is conditioned on: the tokenizer's BOS, else its EOS (lm-eval's HFLM)."""
    for key in ("bos_token", "eos_token"):
        token = tok.config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.token_id(token) is not None:
            return tok.token_id(token)
    return tok.eot_id


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's loglikelihood encoding: (context tokens, continuation tokens) for a causal model."""
    if context == "":  # conditioned on the prefix token, as lm-eval does
        cont = tok.encode(continuation)
        prefix = prefix_token_id(tok)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


# --- scoring ---------------------------------------------------------------------------------------
def _cont_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """Summed log-prob of targets (T,) under logits (T, V), and whether each is the argmax (greedy)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ll = float(logp.gather(-1, targets[:, None]).sum())
    return ll, bool((logp.argmax(-1) == targets).all())


class Scorer:
    """Log-likelihoods of continuations for one model, batched per shared context.

    `model` is a SmolLM2 (prefix KV cache) or any module whose call returns logits or an object with
    `.logits` (HF models: each request as its own padded sequence, as lm-eval runs it).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, max_length: int,
                 autocast: Callable = contextlib.nullcontext):
        self.model, self.device, self.max_length, self.autocast = model, device, max_length, autocast
        self.cached = hasattr(model, "setup_kv_cache")

    @torch.no_grad()
    def score_group(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """One context and its continuations."""
        if not self.cached or len(ctx) + max(map(len, conts)) > self.max_length + 1:
            return [self._score_full(ctx, c) for c in conts]
        model, dev = self.model, self.device
        longest = max(map(len, conts))
        model.setup_kv_cache(1, len(ctx) + longest)
        try:
            with self.autocast():
                h_ctx = model.hidden_states(torch.tensor([ctx], device=dev), start_pos=0)  # (1, Tc, D)
                first = model.lm_head(h_ctx[0, -1:]).float()  # (1, V): predicts every choice's first token
                for layer in model.model.layers:  # the one prefix, copied for each choice
                    cache = layer.self_attn.kv_cache
                    cache.k = cache.k.repeat(len(conts), 1, 1, 1)
                    cache.v = cache.v.repeat(len(conts), 1, 1, 1)
                rest = None
                if longest > 1:
                    x = torch.zeros(len(conts), longest - 1, dtype=torch.long, device=dev)
                    for i, c in enumerate(conts):
                        x[i, : len(c) - 1] = torch.tensor(c[:-1], device=dev)
                    rest = model.lm_head(model.hidden_states(x, start_pos=len(ctx))).float()  # (C, L-1, V)
        finally:
            model.clear_kv_cache()
        out = []
        for i, c in enumerate(conts):
            logits = first if rest is None else torch.cat([first, rest[i, : len(c) - 1]])
            out.append(_cont_logprobs(logits, torch.tensor(c, device=dev)))
        return out

    def _score_full(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """lm-eval's layout: (context + continuation)[-(max_length + 1):][:-1] in one forward."""
        seq = (ctx + cont)[-(self.max_length + 1):]
        x = torch.tensor([seq[:-1]], device=self.device)
        with self.autocast():
            out = self.model(x)
        logits = getattr(out, "logits", out)[0, -len(cont):]
        return _cont_logprobs(logits, torch.tensor(cont, device=self.device))


def score_task(scorer: Scorer, tok: Tokenizer, task: Task) -> dict:
    """acc, acc_norm and n of one task; contexts go longest first so memory peaks at the start."""
    encoded = [[encode_pair(tok, c, x) for c, x in item.requests] for item in task.items]
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, pairs in enumerate(encoded):
        for j, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append((i, j))
    results: dict[tuple[int, int], tuple[float, bool]] = {}
    for ctx in sorted(groups, key=len, reverse=True):
        keys = groups[ctx]
        scores = scorer.score_group(list(ctx), [encoded[i][j][1] for i, j in keys])
        results.update(zip(keys, scores))
    acc = acc_norm = 0
    for i, item in enumerate(task.items):
        lls = np.array([results[(i, j)][0] for j in range(len(item.requests))])
        acc += int(np.argmax(lls) == item.label)
        acc_norm += int(np.argmax(lls / np.array(item.norm_lengths, dtype=float)) == item.label)
    n = len(task.items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def item_loglikelihoods(scorer: Scorer, tok: Tokenizer, item: Item) -> list[float]:
    """Each choice's summed log-prob (what the parity test compares with lm-eval's)."""
    pairs = [encode_pair(tok, c, x) for c, x in item.requests]
    ctxs = {tuple(c) for c, _ in pairs}
    if len(ctxs) == 1:
        return [ll for ll, _ in scorer.score_group(pairs[0][0], [x for _, x in pairs])]
    return [scorer.score_group(c, [x])[0][0] for c, x in pairs]


def score_in_loop(model: torch.nn.Module, tok: Tokenizer, tasks: list[Task], device: torch.device,
                  autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
    """`task/<name>/acc` and `task/<name>/acc_norm` of the model being trained (left in eval mode)."""
    scorer = Scorer(model.eval(), device, model.config.max_position_embeddings, autocast)
    out = {}
    for task in tasks:
        s = score_task(scorer, tok, task)
        out[f"task/{task.name}/acc"], out[f"task/{task.name}/acc_norm"] = s["acc"], s["acc_norm"]
    return out


# --- models and the CLI ----------------------------------------------------------------------------
def load_scorer(path: str, device: torch.device) -> tuple[Scorer, Tokenizer, str]:
    """A Scorer for a checkpoint, run directory or HF directory (any causal LM transformers loads)."""
    from smoltrain.evaluate import hf_config
    from smoltrain.interop import load_resolved, resolve_checkpoint
    from smoltrain.tokenizer import load_tokenizer

    directory = resolve_checkpoint(path)
    if hf_config(directory).get("model_type") == "llama":
        model, tok, _ = load_resolved(directory, device=device)
        return Scorer(model.eval(), device, model.config.max_position_embeddings), tok, str(directory)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except Exception as e:
        raise UserError(f"transformers could not load {directory}: {e}") from None
    max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return Scorer(model.to(device).eval(), device, max_length), load_tokenizer(directory), str(directory)


def evaluate_tasks(paths: list[str], specs: list[str], limit: int | None, device: torch.device) -> list[dict]:
    """`{"model", "tasks": {name: {acc, acc_norm, n}}}` per model; every task is loaded before any model."""
    tasks = [load_task(s, limit) for s in specs]
    rows = []
    for path in paths:
        scorer, tok, name = load_scorer(str(path), device)
        rows.append({"model": name, "tasks": {t.name: score_task(scorer, tok, t) for t in tasks}})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<48} {'task':<24} {'acc':>7} {'acc_norm':>9} {'n':>6}"]
    for r in rows:
        for task, s in r["tasks"].items():
            lines.append(f"{r['model'][-48:]:<48} {task[-24:]:<24} {s['acc']:>7.4f} {s['acc_norm']:>9.4f} {s['n']:>6}")
    return "\n".join(lines)


def tasks_cli(a) -> int:
    """`smoltrain eval MODEL ... --tasks T[,T]`: accuracy per model and task, as a table or JSON."""
    from smoltrain.generate import pick_device

    if a.limit is not None and a.limit < 1:
        raise UserError(f"--limit must be at least 1 (got {a.limit}).")
    rows = evaluate_tasks(a.models, parse_task_specs(a.tasks), a.limit, pick_device(a.device))
    if a.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    else:
        print(format_table(rows))
    return 0
