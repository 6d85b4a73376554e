"""Regenerate the README's quickstart results from one measured fresh-clone run of the current commit.

    python bench/readme_quickstart.py            # clone HEAD into a temp dir, run README command 1 there,
                                                 # rewrite README.md between the quickstart-results markers

The numbers, samples and timings in the README then come from this commit, measured, so they cannot
drift from the code. The command is read from the README itself (the line after "# 1."), so what is
measured is exactly what a new user runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- quickstart-results:begin -->", "<!-- quickstart-results:end -->"


def readme_command(readme: str) -> str:
    """The quickstart's command 1: the first command line after the '# 1.' comment."""
    lines = readme.split("```bash", 1)[1].split("```", 1)[0].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1."))
    return next(line for line in lines[start:] if line and not line.startswith("#"))


def run_fresh_clone(command: str, keep: Path | None) -> tuple[Path, float, str]:
    """Clone HEAD, run the command in the clone; returns (clone dir, seconds, console output)."""
    where = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="smoltrain-readme-"))
    if where.exists():
        shutil.rmtree(where)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], cwd=where, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"README command 1 failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return where, seconds, proc.stdout + proc.stderr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_rows(metrics: list[dict]) -> list[dict]:
    """One row per evaluation step: the val record merged with the task records logged at that step."""
    steps = sorted({r["step"] for r in metrics if "val_loss" in r})
    rows = {step: {"step": step} for step in steps}
    for r in metrics:
        if r.get("step") in rows and ("val_loss" in r or any(k.startswith("task/") for k in r)):
            rows[r["step"]].update(r)
    return [rows[step] for step in steps]


def results_table(evals: list[dict]) -> str:
    """Held-out loss, bits per byte and any task accuracy at each evaluation step."""
    rows = [("held-out loss", "val_loss", ".3f"), ("held-out bits per byte", "val_bpb", ".3f")]
    task_keys = sorted({k for e in evals for k in e if k.startswith("task/") and k.endswith("/acc")})
    rows += [(f"{k.split('/')[1]} accuracy (chance 0.25 for 4 choices)", k, ".3f") for k in task_keys]
    last = len(evals) - 1
    lines = ["| step | " + " | ".join(str(e["step"]) for e in evals) + " |",
             "|---|" + "---:|" * len(evals)]
    for label, key, spec in rows:
        cells = []
        for i, e in enumerate(evals):
            v = e.get(key)
            cell = format(v, spec) if isinstance(v, (int, float)) else "–"
            cells.append(f"**{cell}**" if i == last else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(clone: Path, seconds: float, output: str) -> str:
    run = clone / "runs" / "quickstart"
    metrics = read_jsonl(run / "metrics.jsonl")
    evals = eval_rows(metrics)
    samples = read_jsonl(run / "samples.jsonl") if (run / "samples.jsonl").exists() else []
    final = max((s["step"] for s in samples), default=None)
    sample_text = "\n\n".join(f"[step {s['step']} {s['mode']}] {s['prompt']}{s['text'].rstrip()}"
                              for s in samples if s["step"] == final)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                         text=True).stdout.strip()
    done = next((line for line in output.splitlines() if line.startswith("Done: step")), "")
    return "\n".join([
        BEGIN,
        f"Measured by `python bench/readme_quickstart.py` on {time.strftime('%Y-%m-%d')}, commit {sha}, on "
        f"{machine()}: a fresh clone, README command 1 as written, {seconds / 60:.1f} min in all (pip install "
        f"included). {done}",
        "",
        results_table(evals),
        "",
        f"Samples printed at the end (step {final}; `sampled` = the config's temperature and top-k):",
        "",
        "```",
        sample_text,
        "```",
        END,
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="clone into this directory and keep it (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of rewriting README.md")
    a = ap.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"README.md has no {BEGIN} ... {END} section to rewrite.")
    command = readme_command(readme)
    print(f"running in a fresh clone: {command}", flush=True)
    clone, seconds, output = run_fresh_clone(command, a.keep)
    text = section(clone, seconds, output)
    if a.no_write:
        print(text)
        return
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme_path.write_text(pattern.sub(lambda _: text, readme))
    print(f"rewrote the quickstart results in {readme_path} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
