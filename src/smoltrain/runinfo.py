"""What a run records about itself (env.json, checkpoints): library versions, git SHA, hardware."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch


def git_sha() -> str | None:
    """The commit of the smoltrain source tree in use (None when not a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), not just the architecture platform.processor() gives on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, world_size: int) -> dict:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "git_sha": git_sha(), "python": sys.version.split()[0], "host": socket.gethostname(),
        "versions": {p: _version(p) for p in ("smoltrain", "torch", "transformers", "tokenizers", "numpy")},
        "device": str(device), "device_name": dev, "world_size": world_size, "cpu_threads": torch.get_num_threads(),
    }


def program() -> str:
    """smoltrain as the user typed it, so the commands we suggest can be copied: `.venv/bin/smoltrain`,
    `smoltrain`, or `python -m smoltrain` (the interpreter as typed)."""
    argv = getattr(sys, "orig_argv", None) or sys.argv
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == "smoltrain":
        return f"{argv[0]} -m smoltrain"
    if Path(sys.argv[0]).name == "smoltrain":
        return sys.argv[0]
    return "smoltrain"


def tensorboard_program() -> str:
    """TensorBoard next to the smoltrain the user ran: the same interpreter, or the same bin directory."""
    name = program()
    if name.endswith(" -m smoltrain"):
        return name.removesuffix(" -m smoltrain") + " -m tensorboard.main"
    if "/" in name:
        return str(Path(name).parent / "tensorboard")
    return "tensorboard"
