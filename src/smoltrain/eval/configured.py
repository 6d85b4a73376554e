"""The eval.tasks of a config made real: task files loaded, `next-line:NAME` built from a prepared split.

Used before step 1 by the trainer (a bad file stops the run before any training) and by the report.
"""

from __future__ import annotations

from pathlib import Path

from smoltrain.config import Config
from smoltrain.errors import UserError
from smoltrain.eval.nextline import make_next_line_task
from smoltrain.eval.tasks import SUITES, load_task


def next_line_task_path(cfg: Config, dataset: str) -> Path:
    return cfg.data_dir / "tasks" / f"{dataset}-next-line.jsonl"


def check_eval_tasks(cfg: Config) -> None:
    """Refuse, before any work, eval.tasks the end of the run could not load: a missing or malformed task
    file, an unknown suite name, next-line on a stream (next-line datasets are checked by the config)."""
    for spec in dict.fromkeys(cfg.eval.tasks):
        if spec.startswith("next-line:"):
            if cfg.data.streaming:
                raise UserError(f"eval.tasks {spec!r} needs a prepared dataset (data.streaming is on).")
        elif Path(spec).exists() or spec.endswith(".jsonl"):
            load_task(spec, cfg.eval.tasks_limit)  # a few KB: read now, every line checked
        elif spec not in SUITES:
            raise UserError(f"eval.tasks: unknown task {spec!r}; give a JSONL file or one of {', '.join(SUITES)}.")


def load_eval_tasks(cfg: Config, paths: dict[str, Path] | None, verbose: bool = True) -> list:
    """eval.tasks loaded before training starts (a bad file stops the run before step 1).

    `next-line:NAME` is (re)built from dataset NAME's held-out split each time: it is deterministic and
    takes about a second, and a re-prepared dataset can never leave a stale task behind.
    """
    specs = []
    for spec in dict.fromkeys(cfg.eval.tasks):
        if spec.startswith("next-line:"):
            name = spec.split(":", 1)[1]
            if paths is None:
                raise UserError(f"eval.tasks {spec!r} needs a prepared dataset (data.streaming is on).")
            spec = str(make_next_line_task(paths[name], next_line_task_path(cfg, name), legacy_ok=True))
            if verbose:
                print(f"Built the next-line task from the held-out split of {name!r} -> {spec}")
        specs.append(spec)
    return [load_task(s, cfg.eval.tasks_limit) for s in specs]
