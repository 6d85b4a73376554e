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
