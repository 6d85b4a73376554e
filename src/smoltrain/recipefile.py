"""Reading a recipe file: a bounded, alias-free YAML mapping of sections.

A recipe is a few KiB of user text; a "billion laughs" file of aliases would expand without bound, so
aliases are refused and the file's size is capped before it is parsed. Also the one dotted-path walker
(`optim.lr` in a tree of sections) and `--set KEY=VALUE` parsing. Imports only errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from smoltrain.errors import UserError

MAX_CONFIG_CHARS = 1 << 20  # a recipe is a few KiB; this bounds what parsing it can cost


class AliasError(yaml.YAMLError):
    """A YAML alias: refused (never read as a plain string, as other unparsable --set values are)."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a 1 KB "billion laughs" file expands them without bound, and a recipe
    has no need for them (--set and presets are how values are shared)."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasError(f"YAML aliases (*{event.anchor}) are not accepted in a smoltrain config "
                                 f"({event.start_mark}); write the value out")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """yaml.safe_load without aliases (bounded: the result is no larger than the text)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def read_tree(path: str | Path | None) -> dict:
    """A YAML recipe's mapping of sections ({} for None: the defaults); bounded in size, aliases refused."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"Cannot read config file {path}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"Config file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if len(text) > MAX_CONFIG_CHARS:
        raise UserError(f"Config file {path} is {len(text):,} characters; a recipe is a few KiB (the limit is "
                        f"{MAX_CONFIG_CHARS:,}). Is it the right file?")
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"Malformed YAML in {path}: {str(e).replace(chr(10), ' ')}") from None
    if not isinstance(tree, dict):
        raise UserError(f"Config file {path} must hold a mapping of sections, not {type(tree).__name__}.")
    return tree


def get_dotted(tree: dict, dotted: str, default: Any = None) -> Any:
    """tree["optim"]["lr"] for "optim.lr"; `default` when a key is missing or a section is not a mapping."""
    node: Any = tree
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def flatten_dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists (datasets, stages) stay whole values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects KEY=VALUE (e.g. train.max_steps=100), got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out.append((key.strip(), load_yaml(raw) if raw.strip() else ""))
        except AliasError as e:
            raise UserError(f"--set {key.strip()}: {e}.") from None
        except yaml.YAMLError:
            out.append((key.strip(), raw))
    return out
