"""Declarative value domains for config dataclass fields, checked when a config is resolved.

A field declares what it accepts next to its default, in one line:

    lr: float = checked(3e-3, positive)
    every: int = checked(0, nonneg("only at the end"))
    beta1: float = checked(0.9, interval(0, 1))            # [0, 1)
    schedule: str = checked("wsd", one_of("wsd", "cosine"))

`build(cls, data, ...)` makes a dataclass tree from a YAML dict, naming every unknown key and wrong type;
`problems(obj)` walks that tree and returns one message per value outside its domain, so the config loader
can refuse everything at once, before any work is done. Every float field must also be
finite (no domain needed). None is never checked here: whether a field may be None is its type's business,
and so is the kind of value (a numeric domain lets a string through for a field typed `int | str`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Domain:
    """Allowed values: `ok(value)` says whether one is allowed, `text` says which ("> 0", "in [0, 1)")."""

    ok: Callable[[Any], bool]
    text: str


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric(test: Callable[[float], bool], text: str) -> Domain:
    """A domain on numbers; non-numbers are left to the type check."""
    return Domain(lambda v: not is_number(v) or bool(test(v)), text)


positive = numeric(lambda v: v > 0, "> 0")


def nonneg(zero: str = "") -> Domain:
    """>= 0; `zero` says what 0 means where it is a setting of its own ("off", "all cores")."""
    return numeric(lambda v: v >= 0, ">= 0" + (f" (0: {zero})" if zero else ""))


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Domain:
    """low <= v < high by default (e.g. Adam betas); `low_open` / `high_open` choose each end."""
    def test(v: float) -> bool:
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return numeric(test, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


probability = interval(0, 1, high_open=False)
top_p = interval(0, 1, low_open=True, high_open=False)  # nucleus mass kept; 1: off
device = Domain(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
                "auto, cpu, mps, cuda or cuda:N")
seed = numeric(lambda v: 0 <= v < 2**63, "in [0, 2**63)")  # what torch and numpy generators take

# Sampling temperature: below 1e-4 sampling is greedy in all but name, and a denormal like 1e-300 turns
# logits / T into inf and the softmax into nan; such values are refused with a pointer to 0 (greedy).
MIN_TEMPERATURE = 1e-4
temperature = numeric(lambda v: v == 0 or v >= MIN_TEMPERATURE, f"0 (greedy) or >= {MIN_TEMPERATURE}")


def one_of(*choices: Any) -> Domain:
    return Domain(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def checked(default: Any = dataclasses.MISSING, domain: Domain | None = None, **kw: Any) -> Any:
    """A dataclass field whose value must lie in `domain`; `kw` goes to dataclasses.field."""
    return field(default=default, metadata={"domain": domain}, **kw)


def _floats(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


def problems(obj: Any, prefix: str) -> list[str]:
    """Every value in the dataclass tree `obj` outside its field's domain (lists are checked item by item)."""
    out: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}.{f.name}"
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if isinstance(value, list) else path
            if dataclasses.is_dataclass(item):
                out += problems(item, where)
                continue
            if item is None:
                continue
            if isinstance(item, float) and _floats(hints[f.name]) and not math.isfinite(item):
                out.append(f"{where} must be a finite number (got {item})")
                continue
            domain = f.metadata.get("domain")
            if domain is not None and not domain.ok(item):
                null = " or null" if type(None) in typing.get_args(hints[f.name]) else ""
                out.append(f"{where} must be {domain.text}{null} (got {item!r})")
    return out


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from a dict, recording every unknown key and wrong type in `problems`.

    A field with a wrong type keeps its default, so `problems(...)` and cross-field checks can still run
    and the user sees every mistake at once."""
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            known = ", ".join(sorted(hints))
            problems.append(f"unknown key {path!r} (known keys here: {known})")
            continue
        tp = hints[key]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, path, problems)
        elif inner is not None and dataclasses.is_dataclass(inner) and isinstance(value, list):
            kwargs[key] = [build(inner, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        elif not _type_ok(value, tp):
            problems.append(f"{path} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        else:
            kwargs[key] = float(value) if tp is float or (tp == float | None and value is not None) else value
    return cls(**kwargs)
