"""argparse types that refuse bad values while parsing, so a mistake exits 2 naming the option."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smoltrain import domain
from smoltrain.domain import Domain


def ranged(dom: Domain, parse: type = int) -> Callable[[str], Any]:
    """An argparse type that parses and then refuses values outside `dom`, so argparse exits 2 naming
    the option before any work; floats must also be finite."""
    def convert(raw: str) -> Any:
        try:
            value = parse(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {parse.__name__}, got {raw!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {raw})")
        if not dom.ok(value):
            raise argparse.ArgumentTypeError(f"must be {dom.text} (got {raw})")
        return value

    return convert


POSITIVE = ranged(domain.positive)
DEVICE = ranged(domain.device, str)


def out_dir(raw: str) -> str:
    """An output directory: it may not exist yet, but nothing on its path may be a file."""
    path = Path(raw).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"lies under {p}, which is a file"
            raise argparse.ArgumentTypeError(f"{raw} {what}, not a directory")
    return raw


def out_file(raw: str) -> str:
    """An output file: not a directory, and no file among the directories above it."""
    path = Path(raw).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{raw} is a directory, not a file")
    out_dir(str(path.parent))
    return raw


def out_path(raw: str) -> str:
    """An output that is a directory or a file (export: an HF directory or a .gguf): no file above it."""
    out_dir(str(Path(raw).expanduser().parent))
    return raw
