"""`smoltrain report RUN --out DIR`: one self-contained HTML page about a run (its curves embedded).

It reads only what the run wrote (metrics.jsonl, samples.jsonl, config.yaml, env.json, checkpoints) and
adds two things the logs cannot hold: the configured prompts generated greedily at every kept checkpoint,
and optionally a perplexity / bits-per-byte table of the final checkpoint beside reference models. The
page links no outside resource (inline CSS, PNG curves as data: URIs), so it can be mailed or archived as is.
The layout is templates/report.html.j2; every value it shows is autoescaped, since prompts, samples, run
names and config values are user text.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from smoltrain.checkpoint.discovery import list_checkpoints, newest_valid, resolve_checkpoint, step_of
from smoltrain.errors import UserError
from smoltrain.hf.interop import load_model
from smoltrain.history import History, plot_loss, plot_series, plot_tasks, read_jsonl
from smoltrain.storage import MANIFEST, check_target, publish

REPORT = "index.html"
CHARTS = (  # file, metric (None: the loss chart), title, y label
    ("loss.png", None, "loss", ""),
    ("lr.png", "lr", "learning rate", "lr"),
    ("tokens_per_sec.png", "tokens_per_sec", "throughput", "tokens / s"),
    ("grad_norm.png", "grad_norm", "gradient norm (before clipping)", "global L2 norm"),
)


@dataclass
class Run:
    """What a training run directory holds, read once."""

    dir: Path
    config: dict
    config_text: str
    env: dict
    history: History
    checkpoints: list[Path]

    @property
    def step(self) -> int:
        last = self.history.last()
        return max(last["step"] if last else 0, step_of(self.checkpoints[-1]))


def open_run(path: str | Path) -> Run:
    """Read a run directory, refusing what is not one (or has no checkpoint yet) with a clear message."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise UserError(f"Run directory {d} does not exist.")
    if (d / MANIFEST).exists():
        hint = f" ({d.parent.parent})" if d.parent.name == "checkpoints" else ""
        raise UserError(f"{d} is a checkpoint, not a run directory; pass the run directory{hint}.")
    if not any((d / n).exists() for n in ("metrics.jsonl", "config.yaml", "checkpoints")):
        raise UserError(f"{d} is not a training run directory (no metrics.jsonl, config.yaml or checkpoints/); "
                        "pass the run.dir of a `smoltrain train` run.")
    checkpoints = list_checkpoints(d)
    if not checkpoints:
        raise UserError(f"Run directory {d} has no checkpoints yet; the report generates text at each kept "
                        "checkpoint. Train until the first save (checkpoint.every) and run the report again.")
    config_text = _read_text(d / "config.yaml") or _read_text(checkpoints[-1] / "config.yaml")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        config = {}
    try:
        env = json.loads(_read_text(d / "env.json") or "{}")
    except ValueError:  # torn by a kill mid-write (older smoltrain wrote it in place): the report goes on
        env = {}
    env = env if isinstance(env, dict) else {}
    return Run(d, config if isinstance(config, dict) else {}, config_text, env, History.load(d), checkpoints)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def quiet(_: str) -> None:
    """No progress lines (the CLI passes its own printer)."""


def draw_charts(run: Run) -> list[tuple[str, str]]:
    """(title, PNG as a data: URI) per chart; a chart is left out when its metric was never logged."""
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, metric, title, ylabel in CHARTS:
            target = Path(tmp) / name
            if metric is None:
                path = plot_loss(run.history, target)
            else:
                path = plot_series(run.history, metric, title, ylabel, target)
            if path is not None:
                made.append((title, _data_uri(path)))
        path = plot_tasks(run.history, Path(tmp) / "tasks.png")
        if path is not None:
            made.append(("downstream tasks", _data_uri(path)))
    return made


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def checkpoint_generations(run: Run, prompts: list[str], max_new_tokens: int, device: torch.device,
                           say: Callable[[str], None] = quiet) -> list[dict]:
    """Each prompt, greedily continued by every kept checkpoint: rows of step, val loss, prompt, text."""
    from smoltrain.model.generate import SamplingConfig, generate, prepare_for_decode

    rows = []
    for i, ckpt in enumerate(run.checkpoints):
        step = step_of(ckpt)
        say(f"generating {len(prompts)} prompt(s) x {max_new_tokens} tokens at step {step} "
            f"({i + 1}/{len(run.checkpoints)})")
        val = val_label(run.history, step)
        try:
            model, tok, _ = load_model(ckpt, device=device)
        except UserError as e:  # e.g. corrupt: say so in its row, keep the rest of the report
            rows.append({"step": step, "val_loss": val, "prompt": "", "text": "", "error": str(e)})
            continue
        prepare_for_decode(model)
        for prompt in prompts:
            ids = generate(model, tok.encode(prompt), max_new_tokens, SamplingConfig(temperature=0),
                           stop_ids=[tok.eot_id])
            rows.append({"step": step, "val_loss": val, "prompt": prompt, "text": tok.decode(list(ids))})
        del model
    return rows


def val_label(history: History, step: int) -> str:
    """The val loss at a checkpoint's step, or the nearest evaluation's, labelled with its step."""
    rec = history.nearest_val(step)
    if rec is None or not isinstance(rec.get("val_loss"), (int, float)):
        return "–"
    if rec["step"] == step:
        return f"{rec['val_loss']:.4f}"
    return f"{rec['val_loss']:.4f} (at step {rec['step']})"


def default_data_dir(run: Run) -> Path | None:
    """The run's first prepared dataset, where the config names one and it exists."""
    from smoltrain.config import config_from_dict
    from smoltrain.data.recipe import dataset_path

    try:
        cfg = config_from_dict(run.config, str(run.dir / "config.yaml"))
    except UserError:
        return None
    if not cfg.data.datasets:
        return None
    ds = cfg.data.datasets[0]
    path = dataset_path(cfg, ds.name, ds.path)
    return path if (path / "meta.json").exists() else None


def perplexity_table(models: list[tuple[str, Path]], data: Path, seq_len: int, batch_size: int,
                     max_batches: int, device: torch.device) -> list[dict]:
    """Loss, perplexity and bits-per-byte on data's val split, through smoltrain.eval.bpb (as `eval` does)."""
    from smoltrain.eval.bpb import evaluate_models

    rows = evaluate_models([str(path) for _, path in models], data, "val", seq_len, batch_size,
                           max_batches * batch_size * seq_len, device)
    return [{**row, "model": label, "path": row["model"]} for (label, _), row in zip(models, rows)]


def run_task_specs(run: Run, extra: Sequence[str]) -> list[str]:
    """The config's eval.tasks (next-line:NAME as the file the run built) and --tasks, in that order."""
    from smoltrain.config import config_from_dict
    from smoltrain.eval.configured import next_line_task_path

    specs = []
    try:
        cfg = config_from_dict(run.config, str(run.dir / "config.yaml"))
    except UserError:
        cfg = None
    for spec in (cfg.eval.tasks if cfg else []):
        if spec.startswith("next-line:"):
            built = next_line_task_path(cfg, spec.split(":", 1)[1])
            if not built.exists():
                continue
            spec = str(built)
        specs.append(spec)
    return list(dict.fromkeys([*specs, *extra]))


def task_table(models: list[tuple[str, Path]], specs: list[str], limit: int | None, device: torch.device,
               say: Callable[[str], None] = quiet) -> list[dict]:
    """acc / acc_norm of every model on every task, through smoltrain.eval.tasks (as `eval --tasks` does)."""
    from smoltrain.eval.tasks import load_scorer, load_task, score_task

    tasks = [load_task(s, limit) for s in specs]
    rows = []
    for i, (label, path) in enumerate(models):
        say(f"scoring {len(tasks)} task(s) with {label} ({i + 1}/{len(models)})")
        scorer, tok, _ = load_scorer(str(path), device)
        rows.append({"model": label, "tasks": {t.name: score_task(scorer, tok, t) for t in tasks}})
        del scorer
    return rows


def fmt(v, spec: str | None = None) -> str:
    """A number for a table cell: ints with thousands separators, floats to 4 places, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return format(v, spec or ("," if isinstance(v, int) else ".4f"))


def render(run: Run, charts: list[tuple[str, str]], gens: list[dict], prompts: list[str], max_new_tokens: int,
           ppl: list[dict], data: Path | None, tasks: list[dict] | None = None) -> str:
    """The HTML page: the values are computed here, laid out (and autoescaped) by the template."""
    values = {
        "name": run.dir.name,
        "path": str(run.dir.resolve()),
        "steps": ", ".join(str(step_of(c)) for c in run.checkpoints),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "summary": _summary_rows(run),
        "charts": [{"title": title, "uri": uri} for title, uri in charts],
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "generations": _generation_rows(gens, prompts),
        "perplexity": _perplexity_rows(ppl),
        "data": str(data),
        "tasks": _task_columns(tasks or []),
        "samples": _logged_samples(run),
        "environment": _environment_rows(run),
        "config_text": run.config_text or "No config.yaml in the run directory.",
    }
    return _environment().get_template("report.html.j2").render(values)


@cache
def _environment() -> Environment:
    """HTML templates: every value is autoescaped (prompts, samples, names and config are user text)."""
    return Environment(loader=PackageLoader("smoltrain", "templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _summary_rows(run: Run) -> list[list[str]]:
    history = run.history
    last_val = history.last(evals=True) or {}
    t = history.throughput()
    mfu = fmt(t["median_mfu"], ".1%") if t["median_mfu"] is not None else "n/a (peak FLOP/s unknown here)"
    val = (f"{fmt(last_val.get('val_loss'))} / {fmt(last_val.get('val_ppl'), '.2f')} / "
           f"{fmt(last_val.get('val_bpb'))}")
    speed = f"{fmt(t['median_tokens_per_sec'], ',.0f')} ({fmt(t['max_tokens_per_sec'], ',.0f')})"
    rows = [["steps logged", fmt(run.step)],
            ["tokens seen", fmt(t["tokens"])],
            ["final train loss", fmt((history.last() or {}).get("loss"))],
            ["final val loss / ppl / bits per byte", val],
            ["median tokens/s (max)", speed],
            ["median MFU", mfu],
            ["peak memory (GiB: GPU allocator, or CPU RSS)", fmt(t["peak_mem_gb"], ".2f")]]
    rows += [[f"tokens from {name}", fmt(n)] for name, n in t["tokens_per_source"].items()]
    return rows


def _generation_rows(rows: list[dict], prompts: list[str]) -> list[dict]:
    """One prompt's rows together, oldest checkpoint first; a blank continuation is flagged."""
    order = {p: i for i, p in enumerate(prompts)}
    ordered = sorted(rows, key=lambda r: (order.get(r["prompt"], -1), r["step"]))
    return [{**r, "error": r.get("error", ""), "blank": not r["text"].strip()} for r in ordered]


def _perplexity_rows(rows: list[dict]) -> list[list]:
    return [[r["model"], r["path"], fmt(r["loss"]), fmt(r["ppl"], ".2f"), fmt(r["bpb"]), fmt(r["tokens"])]
            for r in rows]


def _task_columns(rows: list[dict]) -> dict:
    """Headers and cells of the task table: acc and acc_norm per task, then the item counts."""
    names = list(dict.fromkeys(n for r in rows for n in r["tasks"]))
    headers = ["model"] + [f"{n} {m}" for n in names for m in ("acc", "acc_norm")] + ["items"]
    body = [[r["model"], *[fmt(r["tasks"][n][m]) for n in names for m in ("acc", "acc_norm")],
             "/".join(str(r["tasks"][n]["n"]) for n in names)] for r in rows]
    return {"headers": headers, "rows": body, "num_cols": list(range(1, len(headers)))}


def _logged_samples(run: Run) -> list[dict]:
    recs = read_jsonl(run.dir / "samples.jsonl")
    return [{"step": r.get("step"), "mode": r.get("mode"), "prompt": r.get("prompt", ""), "text": r.get("text", "")}
            for r in recs]


def _environment_rows(run: Run) -> list[list[str]]:
    env = dict(run.env)
    versions = env.pop("versions", {}) or {}
    return [[k, fmt(v)] for k, v in env.items()] + [[f"{k} version", fmt(v)] for k, v in versions.items()]


def make_report(run_dir: str | Path, out: str | Path, prompts: list[str] | None = None,
                references: Sequence[str] = (), data: str | Path | None = None, max_new_tokens: int | None = None,
                device: str = "auto", max_batches: int = 50, batch_size: int = 4, tasks: Sequence[str] = (),
                tasks_limit: int | None = None, say: Callable[[str], None] = quiet) -> Path:
    """Write DIR/index.html (charts embedded); returns its path. Inputs are checked before any work; `say`
    hears a line before each slow part (evaluations, tasks, generations can take minutes on a CPU)."""
    from smoltrain.device import pick_device

    run = open_run(run_dir)
    ev = run.config.get("eval") or {}
    prompts = list(ev.get("prompts") or []) if prompts is None else prompts
    if any(not p for p in prompts):
        raise UserError("An empty prompt cannot be continued; give text for every --prompts entry.")
    max_new_tokens = max_new_tokens or int(ev.get("sample_tokens") or 48)
    refs = [(Path(r).name or str(r), _reference(r)) for r in references]  # fail before any slow work
    data_dir = Path(data).expanduser() if data else (default_data_dir(run) if refs else None)
    if refs and data_dir is None:
        raise UserError("--reference needs --data DIR (a prepared dataset); this run's own data was not found.")
    out = Path(out).expanduser()
    check_target(out, "report", True, inputs=[run.dir])  # a report is rebuilt in place; nothing else is
    dev = pick_device(device)
    ppl = []
    if data_dir is not None:
        final = newest_valid(run.dir)
        if final is None:
            raise UserError(f"Run directory {run.dir} has no valid checkpoint to evaluate.")
        seq_len = int((run.config.get("train") or {}).get("seq_len") or 512)
        say(f"evaluating {1 + len(refs)} model(s) on {data_dir} (up to {max_batches} batches each)")
        ppl = perplexity_table([(f"this run (step {step_of(final)})", final), *refs], data_dir, seq_len,
                               batch_size, max_batches, dev)
    specs = run_task_specs(run, tasks)
    limit = tasks_limit or int(ev.get("tasks_limit") or 200)
    scored = [(f"step {step_of(c)}", c) for c in run.checkpoints] + refs
    task_rows = task_table(scored, specs, limit, dev, say) if specs else []
    gens = checkpoint_generations(run, prompts, max_new_tokens, dev, say)
    say("drawing the charts")
    with publish(out, "report", {"run": str(run.dir)}, hashed=False, replace=True) as staging:
        charts = draw_charts(run)
        page = render(run, charts, gens, prompts, max_new_tokens, ppl, data_dir, task_rows)
        (staging / REPORT).write_text(page, encoding="utf-8")
    return out / REPORT


def _reference(path: str) -> Path:
    try:
        return resolve_checkpoint(path)
    except UserError as e:
        raise UserError(f"--reference {path}: {e}") from None
