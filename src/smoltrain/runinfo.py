"""What a run records about itself: library versions, git SHA, hardware; and the header it prints."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from smoltrain.config import Config


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


def print_header(cfg: Config, env: dict, num_params: int, world_size: int) -> None:
    t, m = cfg.train, cfg.model
    seqs = t.micro_batch_size * t.grad_accum_steps * world_size
    print(f"smoltrain {env['versions']['smoltrain']} (git {env['git_sha'] or 'n/a'}), torch {env['versions']['torch']}, "
          f"device {env['device']} ({env['device_name']})", flush=True)
    print(f"model: {num_params:,} parameters ({m.num_hidden_layers} layers, d={m.hidden_size}, "
          f"{m.num_attention_heads}/{m.num_key_value_heads} heads, vocab {m.vocab_size})")
    print(f"global batch = micro {t.micro_batch_size} x accum {t.grad_accum_steps} x world {world_size} = {seqs} "
          f"sequences x {t.seq_len} tokens = {seqs * t.seq_len:,} tokens/step; {t.max_steps} steps")
    print(f"run dir: {cfg.run.dir} (resolved config in config.yaml)", flush=True)


FAULT_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "int": signal.SIGINT}


def fault_point(name: str, step: int) -> None:
    """Test hook: SMOLTRAIN_FAULT="after_step=12" or "in_save=20" SIGKILLs this process right there.

    Lets the crash tests kill a run at an exact point (after an optimizer step, or inside a checkpoint
    save) instead of racing a timer; a no-op when the variable is unset. `NAME=STEP:ACTION` sends
    another signal (stop, term, int) instead, or raises a full disk's OSError (enospc); comma-separated
    specs fire in order ("in_save=5:term,in_save=5:int" is a doubled signal inside a save). Under torchrun, SMOLTRAIN_FAULT_RANK limits it to
    one rank.
    """
    spec = os.environ.get("SMOLTRAIN_FAULT")
    if not spec or os.environ.get("SMOLTRAIN_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    for part in spec.split(","):
        point, _, action = part.strip().partition(":")
        if point == f"{name}={step}" and action == "enospc":
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if point == f"{name}={step}":
            os.kill(os.getpid(), FAULT_ACTIONS[action or "kill"])
