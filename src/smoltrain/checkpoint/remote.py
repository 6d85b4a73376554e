"""A run's mirror on object storage (any fsspec URL): checkpoints, logs, resume on a fresh machine.

Layout under the URL: `checkpoints/step_NNNNNNNN/` (the local checkpoint's files, its manifest.json
uploaded last) and the run's log files (metrics.jsonl, samples.jsonl, config.yaml, env.json, tracker run ids).
A remote checkpoint counts only once its manifest exists, so a kill during an upload never leaves one
that looks valid; a download is verified against that manifest before it is used.

Uploads run on one background thread, one checkpoint at a time: training goes on while the previous
checkpoint uploads, and waits only if the next save comes before that upload ends.

When nodes keep run dirs of their own (no shared filesystem), the store is also where they meet: ranks on
other nodes upload their own optimizer parts during a save (upload_part), rank 0 fetches them (get_part),
and on resume every other node fetches the chosen checkpoint into its own run dir (fetch).
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from smoltrain import storage
from smoltrain.checkpoint.discovery import STEP_DIR, quarantine, step_dir, step_name, step_of
from smoltrain.config import check_remote_url
from smoltrain.errors import UserError
from smoltrain.faults import fault_point

if TYPE_CHECKING:
    pass

LOG_FILES = ("metrics.jsonl", "samples.jsonl", "config.yaml", "config_history.jsonl", "env.json", "wandb.json",
             "trackio.json")


def _explain(e: BaseException) -> str:
    """One sentence for the usual ways a store is unusable; the exception class names the rest."""
    names = {c.__name__ for c in type(e).__mro__}
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return ("no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile), "
                "or pass them in checkpoint.remote_options")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError"}:
        return f"the endpoint cannot be reached ({e}); check AWS_ENDPOINT_URL or checkpoint.remote_options"
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in str(e):
        return f"the bucket or directory does not exist ({e}); create it first"
    if isinstance(e, PermissionError):
        return f"access was denied ({e}); check the credentials' permissions"
    return f"{type(e).__name__}: {e}"


class Remote:
    """The run's copy at `url`: a checkpoint store with manifest-last commits, and the run's log files."""

    def __init__(self, url: str, options: dict | None = None):
        import fsspec

        problems = check_remote_url(url)
        if problems:
            raise UserError(problems[0] + ".")
        opts = dict(options or {})
        if url.startswith(("file://", "local://")):
            opts.setdefault("auto_mkdir", True)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **opts)
        except (ImportError, ValueError, TypeError) as e:
            raise UserError(f"checkpoint.remote {url!r} cannot be opened: {e}.") from None
        self.url = url.rstrip("/")
        self.root = self.root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, step: int) -> str:
        return f"{self.url}/checkpoints/{step_name(step)}"

    def check(self) -> None:
        """Write, read back and delete a probe object: bad endpoints, buckets and credentials exit 2 now."""
        probe = self._path(f".smoltrain-probe-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.pipe_file(probe, b"ok")
            ok = self.fs.cat_file(probe) == b"ok"
            self.fs.rm_file(probe)
        except Exception as e:  # every backend raises its own classes: all mean "unusable"
            raise UserError(f"checkpoint.remote {self.url} is not usable: {_explain(e)}. Nothing was trained.") from None
        if not ok:
            raise UserError(f"checkpoint.remote {self.url} did not return what was written to it.")

    def steps(self, valid_only: bool = True) -> list[int]:
        """Remote checkpoint steps, oldest first; valid means its manifest (uploaded last) exists."""
        self.fs.invalidate_cache()
        pattern = "*/" + storage.MANIFEST if valid_only else "*"
        found = self.fs.glob(self._path("checkpoints", "step_" + pattern))
        steps = set()
        for p in found:
            m = STEP_DIR.match(posixpath.basename(posixpath.dirname(p) if valid_only else p.rstrip("/")))
            if m:
                steps.add(int(m.group(1)))
        return sorted(steps)

    def upload_checkpoint(self, ckpt: Path, step: int, run_dir: Path, keep_last: int,
                          uploaded: Collection[str] = ()) -> None:
        """Logs, then every file of the checkpoint, then its manifest (the commit), then retention.

        `uploaded`: files already on the store (parts that ranks on other nodes put there themselves).
        """
        dest = self._path("checkpoints", ckpt.name)
        manifest = json.loads((ckpt / storage.MANIFEST).read_text())
        if not uploaded:  # re-saving a step: invalidate the old copy first (with parts: done before they went up)
            self.invalidate(step)
        self.upload_logs(run_dir)
        local = self._targets(manifest, ckpt, str(ckpt))
        for i, name in enumerate(n for n in sorted(local) if n not in uploaded):
            self.fs.put_file(str(local[name]), posixpath.join(dest, name))
            if i == 0:
                fault_point("in_upload", step)  # crash tests: die with a half-uploaded checkpoint
        self.fs.put_file(str(ckpt / storage.MANIFEST), posixpath.join(dest, storage.MANIFEST))
        self.retain(keep_last)
        fault_point("after_upload", step)  # crash tests: a preempted machine, its remote copy complete

    def invalidate(self, step: int) -> None:
        """An older copy of this step stops counting (its manifest goes) before new files replace its own."""
        manifest = self._path("checkpoints", step_name(step), storage.MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)

    def upload_part(self, local: Path, step: int, name: str) -> dict:
        """A rank on a node without rank 0's run dir puts its own part of a checkpoint on the store."""
        self.fs.put_file(str(local), self._path("checkpoints", step_name(step), name))
        return storage.file_record(local)

    def get_part(self, step: int, name: str, target: Path, record: dict) -> None:
        """Rank 0 fetches another node's part into its staging dir, checked against what that rank sent."""
        target.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path("checkpoints", step_name(step), name), str(target))
        if not storage.matches_record(target, record):
            raise OSError(f"{name} of step {step} on the store differs from what its rank uploaded")

    def fetch(self, step: int, run_dir: Path) -> Path:
        """A verified copy of remote step N in this node's run dir, for a node without rank 0's run dir.

        A copy from an earlier fetch is kept when it still matches the remote manifest; one that does not
        is set aside (never deleted) and downloaded again.
        """
        final = step_dir(run_dir, step)
        if final.is_dir():
            try:
                same = (final / storage.MANIFEST).read_bytes() == self.fs.cat_file(
                    self._path("checkpoints", final.name, storage.MANIFEST))
                if same and storage.verify_manifest(final):
                    return final
            except (OSError, UserError):
                pass
            quarantine(final)
        print(f"node with {run_dir}: downloading {self.url_of(step)}...", flush=True)
        return self._download(step, Path(run_dir))

    def upload_logs(self, run_dir: Path) -> None:
        """Snapshots of the run's log files (read whole: the trainer may append meanwhile)."""
        for name in LOG_FILES:
            path = Path(run_dir) / name
            if path.is_file():
                self.fs.pipe_file(self._path(name), path.read_bytes())

    def retain(self, keep_last: int) -> None:
        """Keep the newest `keep_last` valid remote checkpoints; older ones (and older partial uploads) go.

        The manifest is removed first, so a checkpoint stops counting before any of its files disappear.
        """
        if keep_last <= 0:
            return
        valid = self.steps()
        if len(valid) <= keep_last:
            return
        oldest_kept = valid[-keep_last]
        for step in self.steps(valid_only=False):
            if step < oldest_kept:
                d = self._path("checkpoints", step_name(step))
                if step in valid:
                    self.fs.rm_file(posixpath.join(d, storage.MANIFEST))
                self.fs.rm(d, recursive=True)

    def restore(self, run_dir: Path, after: int = -1) -> tuple[Path, int] | None:
        """Newest remote checkpoint after step `after` that downloads and verifies, committed into
        RUN/checkpoints; logs first. Returns (local path, step), or None when the remote holds none.
        """
        why = f"No checkpoint in {run_dir}" if after < 0 else f"The store holds checkpoints newer than step {after}"
        for step in reversed([s for s in self.steps() if s > after]):
            print(f"{why}: downloading {self.url_of(step)}...", flush=True)
            try:
                local = self._download(step, Path(run_dir))
            except storage.Escape as e:
                raise UserError(f"checkpoint.remote {self.url} is unsafe: {e} Check who writes that store.") from None
            except UserError as e:
                print(f"remote: skipping {self.url_of(step)}: {e}", file=sys.stderr, flush=True)
                continue
            self.restore_logs(Path(run_dir))
            return local, step
        return None

    def _download(self, step: int, run_dir: Path) -> Path:
        final = step_dir(run_dir, step)
        staging = storage.make_staging(final)  # private to this process and locked (debris rules)
        src = self._path("checkpoints", final.name)
        try:
            raw = self.fs.cat_file(posixpath.join(src, storage.MANIFEST))
            targets = self._targets(json.loads(raw), staging, self.url_of(step))
            for name, target in targets.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(posixpath.join(src, name), str(target))
            (staging / storage.MANIFEST).write_bytes(raw)
            storage.verify_manifest(staging)
            os.unlink(staging / storage.STAGING_LOCK)  # not a checkpoint file; our fd holds the lock to the end
            storage.rename_synced(staging, final)  # durable before it is named a checkpoint, as commit does
        except storage.Escape:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"download failed ({_explain(e)})") from None
        finally:
            storage.drop_staging(staging)
        return final

    @staticmethod
    def _targets(manifest: object, staging: Path, where: str) -> dict[str, Path]:
        """Where each file a store's manifest lists goes, every name checked before anything is written:
        whoever writes the store writes the manifest and its sums, so only containment protects the disk."""
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise UserError(f"{where}/{storage.MANIFEST} is not a smoltrain manifest (no file list)")
        return {name: storage.contained(staging, name, f"{where}/{storage.MANIFEST} entry") for name in files}

    def restore_logs(self, run_dir: Path) -> None:
        """The remote's log files replace local ones, so history reads as if the machine never changed."""
        for name in LOG_FILES:
            src = self._path(name)
            if self.fs.exists(src):
                storage.publish_file(run_dir / name, self.fs.cat_file(src))


class Uploader:
    """One background thread, one job at a time: a new job first waits for the one in flight."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        self._what = ""
        self.errors: list[str] = []

    def submit(self, what: str, job: Callable[[], None]) -> None:
        self.wait()
        self._what = what

        def run() -> None:
            try:
                job()
            except Exception as e:  # the run goes on: the remote is a copy, the local checkpoint is committed
                msg = f"remote: {what} failed: {_explain(e)}"
                self.errors.append(msg)
                print(msg, file=sys.stderr, flush=True)

        self._thread = threading.Thread(target=run, name="smoltrain-upload", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job in flight ends (or `timeout_s` passes); True when nothing is pending."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def drain(self) -> bool:
        """End of run or a signal: finish the pending job within `timeout_s`; False if it did not."""
        if self._thread is None or not self._thread.is_alive():
            return True
        t0 = time.perf_counter()
        print(f"remote: finishing {self._what} (waiting at most {self.timeout_s:.0f} s)...", flush=True)
        if self.wait(self.timeout_s):
            print(f"remote: done in {time.perf_counter() - t0:.1f} s.", flush=True)
            return True
        print(f"remote: {self._what} did not finish in {self.timeout_s:.0f} s (checkpoint.remote_timeout); "
              "the remote keeps its previous complete checkpoint.", file=sys.stderr, flush=True)
        return False


class RunMirror:
    """What the trainer talks to (rank 0): checkpoint.remote and checkpoint.push_to_hub, in the background."""

    def __init__(self, cfg):
        ck = cfg.checkpoint
        self.remote = Remote(ck.remote, ck.remote_options) if ck.remote else None
        if self.remote is not None:
            self.remote.check()
        self.hub_repo = ck.push_to_hub
        self.hub_private = ck.hub_private
        if self.hub_repo:
            from smoltrain.hf.hub import check_token

            check_token(self.hub_repo)
        self.keep_last = ck.keep_last
        self.restored_from: str | None = None  # the remote checkpoint this run resumed from
        self.uploads = Uploader(ck.remote_timeout)

    @classmethod
    def from_config(cfg_cls, cfg) -> RunMirror | None:
        """None when neither is configured; checks the store now (exit 2 before data prep or training)."""
        if not (cfg.checkpoint.remote or cfg.checkpoint.push_to_hub):
            return None
        return cfg_cls(cfg)

    def restore(self, run_dir: Path, after: int = -1) -> Path | None:
        """A fresh machine: the newest valid remote checkpoint (and the logs) into the empty run dir; with
        `after`, only one newer than that step (another node was rank 0 before and saved further)."""
        if self.remote is None:
            return None
        got = self.remote.restore(Path(run_dir), after)
        if got is None:
            return None
        self.restored_from = self.remote.url_of(got[1])
        return got[0]

    def publish(self, ckpt: Path) -> None:
        """Make sure a local checkpoint is on the store (its upload may have been cut short by a kill): the
        other nodes fetch it from there. Synchronous, before training starts."""
        step = step_of(ckpt)
        if step in self.remote.steps():
            return
        print(f"remote: {ckpt.name} is not on {self.remote.url} yet (its upload was interrupted); uploading it "
              "for the other nodes...", flush=True)
        try:
            self.remote.upload_checkpoint(ckpt, step, ckpt.parent.parent, self.keep_last)
        except Exception as e:  # every store raises its own classes
            raise UserError(f"checkpoint.remote {self.remote.url}: uploading {ckpt} failed: {_explain(e)}.") from None

    def run_started(self, run_dir: Path) -> None:
        """Queue an upload of the run's log files (at the start, and after the final evaluation and samples,
        which come after the final checkpoint's upload took its snapshot of them)."""
        if self.remote is not None:
            self.uploads.submit("the upload of the run's log files", lambda: self.remote.upload_logs(run_dir))

    def checkpoint_saved(self, ckpt: Path, step: int, run_dir: Path, uploaded: Collection[str] = ()) -> None:
        """Queue the upload of a committed checkpoint (waits only for the previous upload to end);
        `uploaded` names the parts that ranks on other nodes already put on the store."""
        def job() -> None:
            if self.remote is not None:
                self.remote.upload_checkpoint(ckpt, step, run_dir, self.keep_last, uploaded)
            if self.hub_repo:
                from smoltrain.hf.hub import prune_after_push, push_checkpoint

                push_checkpoint(ckpt, self.hub_repo, step_name(step), self.hub_private)
                prune_after_push(self.hub_repo, self.keep_last, step_name(step))  # reports its own failure

        self.uploads.submit(f"the upload of step {step}", job)

    def finish(self) -> None:
        self.uploads.drain()
