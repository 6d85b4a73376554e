"""Names read from files stay inside their directory: the one containment rule.

Every name a manifest, a store listing, meta.json or a task file gives is checked here before anything is
read or written under it (storage, the store, shards, next-line). Imports only errors.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from smoltrain.errors import UserError


class Escape(UserError):
    """A name read from a file points outside its directory: hostile or damaged, never skipped quietly."""


def contained(root: str | Path, name: object, what: str = "entry") -> Path:
    """`root / name` for a name read from a file (a manifest, a store listing, meta.json), refused unless it
    stays inside `root`: no absolute path, no `..`, no symlink on the way that leads out. Whoever writes such
    a file chooses the names, and a sha256 check does not help (they write the sums too)."""
    text = name if isinstance(name, str) else ""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not text or "\0" in text or Path(text).is_absolute() or ".." in parts:
        raise Escape(f"{what} {shown(name)} in {root} is not a plain relative name inside that directory; "
                        "refusing to read or write it (a file naming paths outside its own directory is hostile "
                        "or damaged). Nothing was written.")
    target = Path(root) / text
    base = Path(root).resolve()
    if target.resolve() != base and base not in target.resolve().parents:
        raise Escape(f"{what} {shown(name)} in {root} leads outside that directory (through a symlink); "
                        "refusing to read or write it. Nothing was written.")
    return target


def shown(value: object, limit: int = 80) -> str:
    """A value from a file, for an error message: its repr cut to `limit` characters (never unbounded)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"
