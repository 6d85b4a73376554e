"""Shared bits for the benchmarks: machine description and JSON-lines output."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def interleaved(command: list[str], impls: list[str], rounds: int) -> dict[str, list[dict]]:
    """Run `command --worker IMPL` once per implementation per round, in ABBA order so that drift in the
    host's speed hits every side alike; each worker prints one JSON line last. Exits with the worker's
    stderr if one fails."""
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            proc = subprocess.run([*command, "--worker", impl], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{impl} worker failed:\n{proc.stderr}")
            results[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def emit(record: dict, out: str | Path | None) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **record}
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def reference_checkpoint(ckpt: str | None, tmp: Path) -> tuple[Path, Path]:
    """(checkpoint, its HF export) for a peer-vs-us bench: `ckpt`, or the real SmolLM2-135M-Instruct
    imported from the asset cache; the export lets the peer (transformers, lm-eval) read the same weights."""
    from smoltrain.hf.interop import export_hf

    if ckpt:
        path = Path(ckpt)
    else:
        from smoltrain.data.assets import fetch_assets
        from smoltrain.hf.interop import import_model

        path = import_model(fetch_assets()["gguf"], tmp / "ckpt")
    return path, export_hf(path, tmp / "hf")
