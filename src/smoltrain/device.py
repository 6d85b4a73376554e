"""Where and in what precision to compute: one rule for train, eval, generate, demo and report.

- device "auto" is cuda > mps > cpu; an explicit device that is not there is a user error;
- dtype "auto" is bf16 on CUDA and fp32 elsewhere: CPU bf16 matmuls are hundreds of times slower than
  fp32, and MPS bf16 autocast is incomplete;
- decoding on CPU uses one torch thread (one token at a time: fork/join costs more than it brings).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from smoltrain.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for 'auto'; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    missing_cuda = device.type == "cuda" and not torch.cuda.is_available()
    missing_mps = device.type == "mps" and not torch.backends.mps.is_available()
    if missing_cuda or missing_mps:
        raise UserError(f"Device {name!r} is not available on this machine.")
    return device


def amp_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The compute dtype: `name` from DTYPES, or for 'auto' bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for this device and dtype (a no-op in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


_threads_lock = threading.Lock()
_threads_state = {"decoders": 0, "saved": 0}


@contextlib.contextmanager
def decode_threads(device: torch.device) -> Iterator[None]:
    """One torch thread while decoding on CPU. The count is process-wide, so concurrent generations
    share it: the first in sets it, the last out restores it."""
    if device.type != "cpu":
        yield
        return
    with _threads_lock:
        if _threads_state["decoders"] == 0:
            _threads_state["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_state["decoders"] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_state["decoders"] -= 1
            if _threads_state["decoders"] == 0:
                torch.set_num_threads(_threads_state["saved"])
