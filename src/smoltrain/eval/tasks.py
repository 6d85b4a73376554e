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

Scoring is batched across items: requests sharing a context form a group, and groups go longest first
under a token budget; a batch's contexts are prefilled together (left-padded) into a KV cache, all their
choices run in one forward after them, and only the positions that predict a choice token go through
lm_head. A 4-choice item costs about one context and four choices, not four contexts.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smoltrain.data.tokenizer import Tokenizer
from smoltrain.errors import UserError
from smoltrain.storage import shown

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


def _item_from_line(obj, where: str) -> Item:
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a JSON object; each line must be "
                        '{"context": str, "choices": [str, ...], "label": int}.')
    missing = [k for k in ("context", "choices", "label") if k not in obj]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}; each line must be "
                        '{"context": str, "choices": [str, ...], "label": int}.')
    context = obj["context"]
    choices = obj["choices"]
    label = obj["label"]
    if not isinstance(context, str):
        raise UserError(f"{where}: context must be a string, got {type(context).__name__}.")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: choices must be a list of at least two non-empty strings, got {shown(choices)}.")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise UserError(f"{where}: label must be an integer index into the {len(choices)} choices, got {shown(label)}.")
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


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets and the hub client read their caches without trying (and retrying) the network, for
    this load only: both libraries read their offline flag at call time, so it is set on them here and
    put back after. The process environment is never touched, and a later push_to_hub goes online."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in flags if hasattr(mod, attr)]
    try:
        for mod, attr, _ in saved:
            setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


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
    from lm_eval.tasks import TaskManager

    offline = _hub_offline() if not hub_reachable() else contextlib.nullcontext()
    try:
        with offline:
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


Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)
Score = tuple[float, bool]  # (summed log-prob of the continuation, whether it is the greedy one)
TOKEN_BUDGET = 4096  # choice rows x padded (context + choice) positions a batch: bounds its KV cache
LOGIT_ROWS = 256  # rows through lm_head at a time: 256 x 49152 fp32 logits are 48 MiB


def _cont_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> Score:
    """Summed log-prob of targets (T,) under logits (T, V), and whether each is the argmax (greedy)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ll = float(logp.gather(-1, targets[:, None]).sum())
    return ll, bool((logp.argmax(-1) == targets).all())


class Scorer:
    """Log-likelihoods of continuations for one model, batched across items.

    `model` is a SmolLM2: contexts are prefilled once each into a KV cache, several together
    (left-padded), and all their choices run in one batch after them; only the positions that predict a
    choice token go through lm_head. Any other module whose call returns logits or an object with
    `.logits` (HF models) scores each request as its own sequence, as lm-eval runs it.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, max_length: int,
                 autocast: Callable = contextlib.nullcontext, token_budget: int = TOKEN_BUDGET):
        self.model = model
        self.device = device
        self.max_length = max_length
        self.autocast = autocast
        self.token_budget = token_budget
        self.cached = hasattr(model, "new_kv_cache")

    @torch.inference_mode()
    def score(self, requests: list[Request]) -> list[Score]:
        """Every request's score, in order. Requests sharing a context form a group; groups go longest
        first (memory peaks at the start, neighbours in a batch pad little), batched up to the budget."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        out: list[Score] = [(0.0, False)] * len(requests)
        batch: list[tuple[list[int], list[int]]] = []  # (context, its request indices)
        longest = {ctx: max(len(requests[i][1]) for i in idx) for ctx, idx in groups.items()}
        for ctx in sorted(groups, key=lambda c: (len(c), longest[c]), reverse=True):
            idx = groups[ctx]
            if not self.cached or len(ctx) + longest[ctx] > self.max_length + 1:
                for i in idx:
                    out[i] = self._score_full(list(ctx), requests[i][1])
                continue
            if batch and _cells(batch + [(list(ctx), idx)], requests) > self.token_budget:
                self._run(batch, requests, out)
                batch = []
            batch.append((list(ctx), idx))
        if batch:
            self._run(batch, requests, out)
        return out

    def _run(self, batch: list[tuple[list[int], list[int]]], requests: list[Request], out: list[Score]) -> None:
        conts = [[requests[i][1] for i in idx] for _, idx in batch]
        scores = self._score_batch([ctx for ctx, _ in batch], conts)
        for (_, idx), s in zip(batch, scores):
            for i, score in zip(idx, s):
                out[i] = score

    def _score_batch(self, ctxs: list[list[int]], conts: list[list[list[int]]]) -> list[list[Score]]:
        """Contexts (left-padded, one prefill) and each one's choices (one forward on the cache)."""
        model = self.model
        dev = self.device
        width = max(map(len, ctxs))
        flat = [c for cs in conts for c in cs]
        longest = max(map(len, flat))
        pad = torch.tensor([width - len(c) for c in ctxs], device=dev)
        ids = torch.tensor([[0] * (width - len(c)) + c for c in ctxs], device=dev)  # (G, Tc)
        owner = torch.tensor([g for g, cs in enumerate(conts) for _ in cs], device=dev)  # (R,) each row's context
        with self.autocast():
            cache = model.new_kv_cache(len(ctxs), width)
            h = model.hidden_states(ids, start_pos=0, cache=cache, pad=pad)[:, -1][owner]  # (R, D)
            if longest > 1:  # the choices' own tokens, after their context copied into each row's cache
                rows = model.new_kv_cache(len(flat), width + longest - 1)
                for small, big in zip(cache.layers, rows.layers):
                    big.k[:, :, :width] = small.k[owner]
                    big.v[:, :, :width] = small.v[owner]
                x = torch.tensor([c[:-1] + [0] * (longest - len(c)) for c in flat], device=dev)  # right-padded
                rest = model.hidden_states(x, start_pos=width, cache=rows, pad=pad[owner])  # (R, L-1, D)
                h = torch.cat([h[:, None], rest], dim=1)  # (R, L, D): position j predicts token j
            lengths = [len(c) for c in flat]
            keep = torch.tensor([r * longest + j for r, n in enumerate(lengths) for j in range(n)], device=dev)
            lls, misses = self._token_scores(h.reshape(-1, h.shape[-1])[keep], torch.tensor(
                [t for c in flat for t in c], device=dev), torch.tensor(lengths, device=dev))
        scores = list(zip(lls.tolist(), (misses == 0).tolist()))
        out = []
        for cs in conts:
            out.append(scores[: len(cs)])
            scores = scores[len(cs):]
        return out

    def _token_scores(self, h: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per choice, the summed log-prob of its tokens and how many are not the argmax; h (N, D) holds
        just the positions that predict a choice token, LOGIT_ROWS at a time through lm_head."""
        which = torch.repeat_interleave(torch.arange(len(lengths), device=h.device), lengths)  # (N,)
        lls = torch.zeros(len(lengths), dtype=torch.float64, device=h.device)
        misses = torch.zeros(len(lengths), dtype=torch.long, device=h.device)
        for lo in range(0, h.shape[0], LOGIT_ROWS):
            t = targets[lo : lo + LOGIT_ROWS]
            logp = F.log_softmax(self.model.lm_head(h[lo : lo + LOGIT_ROWS]).float(), dim=-1)
            lls.index_add_(0, which[lo : lo + LOGIT_ROWS], logp.gather(-1, t[:, None])[:, 0].double())
            misses.index_add_(0, which[lo : lo + LOGIT_ROWS], (logp.argmax(-1) != t).long())
        return lls, misses

    def _score_full(self, ctx: list[int], cont: list[int]) -> Score:
        """lm-eval's layout: (context + continuation)[-(max_length + 1):][:-1] in one forward."""
        seq = (ctx + cont)[-(self.max_length + 1):]
        x = torch.tensor([seq[:-1]], device=self.device)
        with self.autocast():
            out = self.model(x)
        logits = getattr(out, "logits", out)[0, -len(cont):]
        return _cont_logprobs(logits, torch.tensor(cont, device=self.device))


def _cells(batch: list[tuple[list[int], list[int]]], requests: list[Request]) -> int:
    """What a batch costs against the token budget: its choice rows x their padded length."""
    rows = sum(len(idx) for _, idx in batch)
    longest = max(len(requests[i][1]) for _, idx in batch for i in idx)
    return rows * (max(len(ctx) for ctx, _ in batch) + longest - 1)


def score_task(scorer: Scorer, tok: Tokenizer, task: Task) -> dict:
    """acc, acc_norm and n of one task; every request of every item scored in one call (batched)."""
    encoded = [[encode_pair(tok, c, x) for c, x in item.requests] for item in task.items]
    scores = iter(scorer.score([pair for pairs in encoded for pair in pairs]))
    acc = acc_norm = 0
    for item in task.items:
        lls = np.array([next(scores)[0] for _ in item.requests])
        acc += int(np.argmax(lls) == item.label)
        acc_norm += int(np.argmax(lls / np.array(item.norm_lengths, dtype=float)) == item.label)
    n = len(task.items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def item_loglikelihoods(scorer: Scorer, tok: Tokenizer, item: Item) -> list[float]:
    """Each choice's summed log-prob (what the parity test compares with lm-eval's)."""
    return [ll for ll, _ in scorer.score([encode_pair(tok, c, x) for c, x in item.requests])]


def score_in_loop(model: torch.nn.Module, tok: Tokenizer, tasks: list[Task], device: torch.device,
                  autocast: Callable = contextlib.nullcontext) -> dict[str, float]:
    """`task/<name>/acc` and `task/<name>/acc_norm` of the model being trained (left in eval mode)."""
    scorer = Scorer(model.eval(), device, model.config.max_position_embeddings, autocast)
    out = {}
    for task in tasks:
        s = score_task(scorer, tok, task)
        out[f"task/{task.name}/acc"] = s["acc"]
        out[f"task/{task.name}/acc_norm"] = s["acc_norm"]
    return out


def load_scorer(path: str, device: torch.device) -> tuple[Scorer, Tokenizer, str]:
    """A Scorer for a checkpoint, run directory or HF directory (any causal LM transformers loads)."""
    from smoltrain.hf.interop import load_causal_lm

    model, tok, directory = load_causal_lm(path, device)
    max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return Scorer(model, device, max_length), tok, str(directory)


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
