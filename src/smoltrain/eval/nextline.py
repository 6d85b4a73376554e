"""An offline multiple-choice task from held-out text: given a few lines, pick the true next line of four.

Built from a prepared dataset's held-out split (its tokens decoded back to the documents, so it needs
nothing but the prepared directory and sees exactly the text the model never trained on). For the
Shakespeare corpus that is verse and prose from the held-out plays. The distractors are other lines of
the held-out documents (from another document where there is one), and everything is drawn from one
seeded generator, so the same data and seed give the same file byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from smoltrain.errors import UserError
from smoltrain.storage import check_inputs, publish_file

ORIGIN = "smoltrain tasks next-line"  # every item carries it: the record that the file is ours to replace
MIN_CHARS = 20  # shorter lines ("Well, what then?") are guessable from length alone
FAR = 50  # distractors come from at least this many lines away


def held_out_documents(data: str | Path) -> list[str]:
    """The texts of the held-out documents of a prepared directory, in stored order."""
    from smoltrain.data.shards import load_meta, read_shard, split_shards
    from smoltrain.data.tokenizer import load_tokenizer

    meta = load_meta(data)
    val = meta["splits"].get("val") or {}
    if not val.get("num_tokens"):
        raise UserError(f"{data} has no held-out documents to build a task from (its val split is empty).")
    tok = load_tokenizer(Path(data) / "tokenizer")
    tokens = np.concatenate([read_shard(p) for p in split_shards(data, meta, "val")])
    ends = np.flatnonzero(tokens == meta["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends) if e > s]


def _is_candidate(line: str) -> bool:
    """A line of speech: long enough, not a speaker's name (upper case) or a stage direction."""
    text = line.strip()
    return len(text) >= MIN_CHARS and not text.isupper() and not text.startswith(("[", "<", "ACT ", "SCENE "))


def build_items(docs: list[str], num_items: int, context_lines: int = 4, num_choices: int = 4,
                seed: int = 0) -> list[dict]:
    """Items `{"context", "choices", "label"}`; targets evenly spaced over all candidate lines."""
    lines = [[line.rstrip() for line in d.splitlines()] for d in docs]
    targets = [(d, i) for d, ls in enumerate(lines) for i in range(context_lines, len(ls))
               if _is_candidate(ls[i]) and ls[i - 1].strip()]  # mid-speech: the line before is not blank
    pool = [[(i, ls[i].strip()) for i in range(len(ls)) if _is_candidate(ls[i])] for ls in lines]
    every = sorted({t for p in pool for _, t in p})
    if not targets or len(every) < num_choices:
        raise UserError(f"The held-out documents have too few lines of at least {MIN_CHARS} characters for a "
                        f"{num_choices}-choice next-line task.")
    rng = random.Random(seed)
    step = max(1, len(targets) // num_items)
    items = []
    for d, i in targets[::step][:num_items]:
        answer = lines[d][i].strip()
        # same document (same spelling and edition), far from the answer, so style gives nothing away
        others = [t for j, t in pool[d] if abs(j - i) > FAR and t != answer]
        if len(set(others)) < num_choices - 1:  # a short document: anywhere in it but the context
            others = [t for j, t in pool[d] if not i - context_lines <= j <= i and t != answer]
        if len(set(others)) < num_choices - 1:
            others = [t for t in every if t != answer]
        distractors = []
        while len(distractors) < num_choices - 1:  # draws in a fixed order: deterministic by seed
            line = others[rng.randrange(len(others))]
            if line not in distractors:
                distractors.append(line)
        label = rng.randrange(num_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        context = "\n".join(lines[d][i - context_lines:i]) + "\n"
        items.append({"context": context, "choices": choices, "label": label, "origin": ORIGIN})
    return items


def write_task(items: list[dict], out: str | Path) -> Path:
    """Published whole (storage.publish_file), so a half-written task file never exists."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return publish_file(out, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))


def written_by_us(path: Path, legacy_ok: bool = False) -> bool:
    """Every line of the file is a next-line item this command wrote (its origin says so); with `legacy_ok`
    (the trainer's own data_dir/tasks/) also items written before they carried an origin."""
    try:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    legacy = {"context", "choices", "label"}
    return bool(lines) and all(isinstance(x, dict) and (x.get("origin") == ORIGIN or legacy_ok and set(x) == legacy)
                               for x in lines)


def check_task_out(out: str | Path, data: str | Path, force: bool, legacy_ok: bool = False) -> None:
    """Before any work: `out` is not the prepared data or inside it, and an existing file there is replaced
    only when it is an earlier next-line task (never a user's file, even with --force)."""
    out = Path(out).expanduser()
    check_inputs(out, [data])
    if Path(data).expanduser().resolve() in out.resolve().parents:
        raise UserError(f"--out {out} lies inside the prepared dataset {data}, which this command reads; writing "
                        "there would add a file to it. Choose another --out.")
    if not out.exists():
        return
    if not written_by_us(out, legacy_ok):
        raise UserError(f"--out {out} exists and is not a next-line task smoltrain wrote; it is never replaced, "
                        "even with --force. Choose another --out, or move that file away yourself.")
    if not force:
        raise UserError(f"--out {out} exists (an earlier next-line task); pass --force to replace it, or choose "
                        "another --out.")


def make_next_line_task(data: str | Path, out: str | Path, num_items: int = 500, seed: int = 0,
                        context_lines: int = 4, force: bool = True, legacy_ok: bool = False) -> Path:
    check_task_out(out, data, force, legacy_ok)
    return write_task(build_items(held_out_documents(data), num_items, context_lines, seed=seed), out)
