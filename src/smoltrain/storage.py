"""Publishing directories atomically, and the rules for replacing one.

Every command that produces a directory (train's checkpoints, prepare, tokenizer train, assets, import,
export, report) writes it the same way: into a staging directory beside the target whose name is private
to the process (`.staging-<name>-<pid>-<hex>`), every file and directory fsynced, a marker (a sha256
manifest for checkpoints) written last, then one rename into place. A directory with the final name is
therefore always complete, and one with a marker says which command wrote which files.

`--force` may replace only a previous output of the same command whose files are all its own (the marker
lists them); never the command's inputs, a directory that holds them, or anything with foreign files.

This module also holds the one sha256 helper pair (files, strings). How a run's checkpoints are named
and found is checkpoint.discovery's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from smoltrain.errors import TrainingError, UserError

MANIFEST = "manifest.json"  # checkpoints (train, import, export): sha256 of every file
MARKER = ".smoltrain-output.json"  # other outputs (prepare, tokenizer, report, assets): sizes of every file
FORMAT = "smoltrain-output"
PRIVATE = re.compile(r"^\.(staging|old|deleting)-(?P<name>.+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (checkpoints are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str | bytes) -> str:
    """Hex sha256 of a string (UTF-8) or bytes: the cache keys and names derived from a recipe."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    for p in sorted(Path(directory).rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_file() or p.is_dir():
            fsync_path(p)
    fsync_path(directory)


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def publish_file(path: Path, data: str | bytes) -> Path:
    """A file that appears whole (a log rewritten on resume, a task file, a tracker id): written under a
    name private to this process beside it, fsynced, then renamed over `path` and the rename made durable."""
    path = Path(path)
    tmp = private_name("staging", path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def rewrite_jsonl(path: Path, keep: Callable[[dict], bool], append: Iterable[dict] = ()) -> None:
    """Keep the records of a JSONL log for which `keep` holds (a resumed run rewinds its logs to the
    resumed step), add `append`, and publish the file whole. A line torn by a kill mid-write, or one
    that is not a record `keep` can read, goes."""
    lines = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if keep(json.loads(line)):
                    lines.append(line)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    lines += [json.dumps(record) for record in append]
    publish_file(path, "".join(line + "\n" for line in lines))


def _files(directory: Path, skip: str) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != skip)


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
    if not _inside(target.resolve(), base):
        raise Escape(f"{what} {shown(name)} in {root} leads outside that directory (through a symlink); "
                        "refusing to read or write it. Nothing was written.")
    return target


def shown(value: object, limit: int = 80) -> str:
    """A value from a file, for an error message: its repr cut to `limit` characters (never unbounded)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def write_manifest(directory: Path, command: str, info: dict | None = None, hashed: bool = True) -> None:
    """The record of what `command` wrote into `directory`, written last (with sha256 when `hashed`)."""
    directory = Path(directory)
    name = MANIFEST if hashed else MARKER
    files = {}
    for p in _files(directory, name):
        files[str(p.relative_to(directory))] = file_record(p) if hashed else {"size": p.stat().st_size}
    doc = {"format": FORMAT if not hashed else "smoltrain-checkpoint", "version": 1, "command": command,
           **(info or {}), "files": files}
    write_text_synced(directory / name, json.dumps(doc, indent=2) + "\n")


def file_record(path: Path) -> dict:
    """A file's entry in a manifest: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def matches_record(path: Path, rec: dict) -> bool:
    """The file has the size and sha256 its manifest entry records (the size is checked first: cheap)."""
    return path.stat().st_size == rec.get("size") and sha256_file(path) == rec.get("sha256")


def read_manifest(directory: Path) -> dict:
    try:
        doc = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"Checkpoint {directory} has a missing or unreadable {MANIFEST} ({e}).") from None
    if not isinstance(doc, dict):
        raise UserError(f"Checkpoint {directory} has a {MANIFEST} that is not a JSON object.")
    return doc


def verify_manifest(directory: Path) -> dict:
    """The manifest, after checking every file it lists exists with the recorded size and sha256."""
    manifest = read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise UserError(f"Checkpoint {directory} has a {MANIFEST} without a file list.")
    for name, rec in files.items():
        path = contained(directory, name, f"{MANIFEST} entry")
        if not isinstance(rec, dict):
            raise UserError(f"Checkpoint {directory} has a {MANIFEST} whose entry for {shown(name)} is not a record.")
        if not path.is_file():
            raise UserError(f"Checkpoint {directory} is incomplete: {name} is missing.")
        if not matches_record(path, rec):
            raise UserError(f"Checkpoint {directory} is corrupted: {name} does not match its sha256 in {MANIFEST}.")
    return manifest


def output_record(directory: Path) -> dict | None:
    """The manifest or marker of a directory smoltrain wrote, with its command; None for anything else."""
    for name in (MANIFEST, MARKER):
        try:
            doc = json.loads((Path(directory) / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
            continue
        command = doc.get("command")
        if command:
            return {**doc, "command": command, "record": name}
    return None


def _resolved(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def foreign_files(directory: Path, record: dict | None) -> list[str]:
    """Files in `directory` that its record does not list (all of them when there is no record)."""
    listed = set((record or {}).get("files", {})) | ({record.get("record")} if record else set())
    return [str(p.relative_to(directory)) for p in _files(directory, "") if str(p.relative_to(directory)) not in listed]


def check_inputs(out: str | Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse (exit 2) an `out` that is, or contains, one of the command's inputs."""
    target = _resolved(out)
    for src in inputs:
        src_path = _resolved(src)
        if _inside(src_path, target):
            what = "is" if src_path == target else "contains"
            raise UserError(f"{flag} {out} {what} this command's own input {src}; writing there would replace "
                            f"it. Choose another {flag}.")


def check_target(out: str | Path, command: str, force: bool, inputs: Iterable[str | Path] = (),
                 flag: str = "--out") -> None:
    """Refuse (exit 2, naming the path) before any work when publishing `command`'s output at `out` could
    lose something: `out` is or holds one of the command's inputs, or holds files the command did not write,
    or is a previous output and --force was not given. An empty directory is fine."""
    out_path = Path(out).expanduser()
    check_inputs(out_path, inputs, flag)
    if not out_path.exists():
        return
    if not out_path.is_dir():
        raise UserError(f"{flag} {out_path} exists and is a file, not a directory; choose another {flag}.")
    if not any(out_path.iterdir()):
        return
    record = output_record(out_path)
    foreign = foreign_files(out_path, record) if record and record["command"] == command else []
    if record is None or record["command"] != command or foreign:
        made = f"the output of smoltrain {record['command']}" if record else "not an output of smoltrain " + command
        extra = f" and holds files it did not write ({', '.join(foreign[:3])})" if foreign else ""
        raise UserError(f"{flag} {out_path} already exists and is {made}{extra}; smoltrain {command} never "
                        f"replaces such a directory, even with --force. Choose another {flag}, or move it away "
                        "yourself.")
    if not force:
        raise UserError(f"{flag} {out_path} already exists (an earlier output of smoltrain {command}); pass --force "
                        f"to replace it, or choose another {flag}.")


def check_file_target(out: str | Path, command: str, force: bool, inside: Iterable[str | Path] = (),
                      ours: Callable[[Path], bool] = lambda p: False, flag: str = "--out") -> None:
    """check_target for a command whose output is one file (export --format gguf): refuse (exit 2) an `out`
    that lies inside one of `inside` (the run dir, the checkpoint: a foreign file there breaks their
    manifests), a directory, or an existing file that `ours` does not recognise as an earlier output of
    `command` (replaced only with --force)."""
    out_path = Path(out).expanduser()
    for d in inside:
        if _inside(_resolved(out_path), _resolved(d)):
            raise UserError(f"{flag} {out_path} lies inside {d}, this command's own input; a file written there "
                            f"would be foreign to it. Choose an {flag} outside it.")
    if out_path.is_dir():
        raise UserError(f"{flag} {out_path} is a directory; smoltrain {command} writes one file there. Name the "
                        "file instead.")
    if not out_path.exists():
        return
    if not ours(out_path):
        raise UserError(f"{flag} {out_path} already exists and is not an earlier output of smoltrain {command}; it "
                        f"is never replaced, even with --force. Choose another {flag}, or move it away yourself.")
    if not force:
        raise UserError(f"{flag} {out_path} already exists (an earlier output of smoltrain {command}); pass --force "
                        f"to replace it, or choose another {flag}.")


@contextlib.contextmanager
def staged_file(final: str | Path, replace: bool = False,
                ours: Callable[[Path], bool] = lambda p: False) -> Iterator[Path]:
    """publish_file for a file a library writes itself (the GGUF writer): yield a private staging path
    beside `final`; on success fsync it and rename it onto `final` (the commit point: a file with the final name is always complete). An existing `final` is replaced only with
    `replace` and while `ours` still recognises it. On any exception the staging file is removed."""
    final = Path(final).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = private_name("staging", final)
    try:
        yield staging
        fsync_path(staging)
        if final.exists() and not (replace and ours(final)):
            raise UserError(f"{final} appeared while it was being written, or is no longer ours; it was left alone.")
        os.replace(staging, final)
        fsync_path(final.parent)
    finally:
        staging.unlink(missing_ok=True)


def private_name(kind: str, final: Path) -> Path:
    """`.<kind>-<name>-<pid>-<hex>` beside `final`: no other process ever picks the same name."""
    return final.parent / f".{kind}-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


STAGING_LOCK = ".smoltrain-staging.lock"  # flocked by the writer while a staging dir is being filled
LOCKLESS_GRACE_S = 3600  # a staging dir without its lock file is left alone this long after its last change
_held: dict[Path, int] = {}  # staging dir -> the fd of its held lock


def make_staging(final: Path) -> Path:
    """A private staging dir beside `final`, locked (flock) by this process until commit or drop_staging:
    a cleaner in another PID namespace (a container sharing the disk) cannot see our PID, but it sees the lock."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = private_name("staging", final)
    staging.mkdir()
    fd = os.open(staging / STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held[staging] = fd
    return staging


def _unlock(staging: Path, unlink: bool) -> None:
    fd = _held.pop(Path(staging), None)
    if unlink:
        with contextlib.suppress(OSError):
            os.unlink(Path(staging) / STAGING_LOCK)
    if fd is not None:
        os.close(fd)


def drop_staging(staging: Path) -> None:
    """Remove a staging dir this process made (a failed or abandoned write), releasing its lock last."""
    shutil.rmtree(staging, ignore_errors=True)
    _unlock(staging, unlink=False)


def commit(staging: Path, final: Path, command: str, info: dict | None = None, hashed: bool = True,
           replace: bool = False, keep_existing: bool = False) -> Path:
    """Write the record, fsync everything, rename `staging` to `final` (the commit point).

    An existing `final` is replaced only with `replace` (the caller checked it with check_target) and only
    once the new one is complete; with `keep_existing` (a cache another process filled first) ours is
    dropped. An empty directory at `final` is simply taken over.
    """
    staging = Path(staging)
    final = Path(final)
    with contextlib.suppress(OSError):  # not one of the output's files; the fd keeps the lock until the rename
        os.unlink(staging / STAGING_LOCK)
    write_manifest(staging, command, info, hashed)
    fsync_tree(staging)  # before an earlier output is moved aside: that window stays one rename long
    old = None
    if final.exists():
        if keep_existing:
            drop_staging(staging)
            return final
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        elif not replace:
            raise UserError(f"{final} appeared while it was being written; it was left alone.")
        else:
            check_target(final, command, force=True)  # still only our own earlier output
            old = private_name("old", final)
            os.replace(final, old)
    rename_synced(staging, final, synced=True)
    _unlock(staging, unlink=False)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rename_synced(staging: Path, final: Path, synced: bool = False) -> None:
    """The commit point of a finished staging directory: every file and directory in it fsynced (unless
    the caller just did), one rename to `final` (which must not exist), and the new name made durable."""
    if not synced:
        fsync_tree(staging)
    os.replace(staging, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def publish(final: str | Path, command: str, info: dict | None = None, hashed: bool = True,
            replace: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a private staging directory beside `final`; on success commit it there.

    On any exception (ENOSPC included) the staging directory is removed and `final` is untouched.
    """
    final = Path(final).expanduser()
    staging = make_staging(final)
    try:
        yield staging
        commit(staging, final, command, info, hashed, replace, keep_existing)
    finally:
        drop_staging(staging)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _idle(p: Path) -> float:
    """Seconds since `p` last changed (0 when it cannot be read: never old enough to remove)."""
    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def staging_dead(p: Path, pid: int) -> bool:
    """A private dir's writer is provably gone: its staging lock can be taken (the kernel drops an flock when
    its holder dies, whatever PID namespace it ran in). A dir without a lock file (one being committed, or
    from an older smoltrain) counts as dead only when its PID is gone here too and it has not changed for
    LOCKLESS_GRACE_S: a PID lookup alone cannot see a writer in another container sharing the disk."""
    try:
        fd = os.open(p / STAGING_LOCK, os.O_RDWR)
    except FileNotFoundError:
        try:
            idle = time.time() - p.stat().st_mtime
            empty = not any(p.iterdir())  # a writer killed between mkdir and its lock: nothing to lose
        except OSError:
            return False
        return (empty or idle > LOCKLESS_GRACE_S) and not pid_alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove `.staging-`/`.old-`/`.deleting-` dirs (and single-file staging files) in `parent` (for `name`
    only, if given) whose writer is provably gone (staging_dead; a staging file: its PID gone and it has not
    changed for LOCKLESS_GRACE_S). Anything else, and the private dirs of live writers, is left alone."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = PRIVATE.match(p.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if p in _held or pid == os.getpid():
            continue
        if p.is_dir() and staging_dead(p, pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_file() and not pid_alive(pid) and _idle(p) > LOCKLESS_GRACE_S:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_dir(directory: Path) -> None:
    """Delete a directory we own: renamed to a private name first, so it leaves discovery at once."""
    doomed = private_name("deleting", Path(directory))
    os.replace(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def is_no_space(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (safetensors) reports it in its own exception type."""
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def no_space_error(e: BaseException, what: str) -> TrainingError:
    return TrainingError(f"The disk is full (no space left on device) while writing {what}; the partial output "
                         "was removed and nothing earlier was touched. Free some space and run the same command "
                         "again.")


def format_bytes(n: float) -> str:
    """Sizes a person reads: 512 B, 3.4 KiB, 12.0 MiB, 1.25 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def tree_size(directory: Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
