"""Publishing to the Hugging Face Hub: an HF export (weights, config, tokenizer, model card) as one commit.

huggingface_hub reads HF_TOKEN (or the token `hf auth login` saved) and HF_ENDPOINT (a mirror or a
private Hub) itself; we only check that a token exists before any work is done.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from smoltrain.errors import UserError

STEP_BRANCH = re.compile(r"step_\d{8}")  # checkpoint.push_to_hub's branches; any other name is the user's


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def check_token(repo_id: str) -> None:
    """Refuse before exporting or training when no Hub token is available: uploads need one."""
    from huggingface_hub import get_token

    if "/" not in repo_id or repo_id.count("/") > 1:
        raise UserError(f"Hub repo id must be NAMESPACE/NAME, got {repo_id!r}.")
    if not get_token():
        raise UserError(f"Pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN (a write token) or run "
                        "`hf auth login` first.")


def _network_error(e: BaseException) -> bool:
    """The Hub said no, or could not be reached: HTTP errors, OSError, and the HTTP client's transport errors
    (huggingface_hub's client is an httpx fork whose classes are named, not imported, here)."""
    from huggingface_hub.errors import HfHubHTTPError

    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (HfHubHTTPError, OSError)) or bool(names & {"HTTPError", "TransportError", "RequestError"})


def push_folder(folder: Path, repo_id: str, revision: str | None = None, private: bool = False,
                message: str = "Upload from smoltrain", repo_type: str = "model") -> str:
    """Create the repo (and branch) if needed, then upload `folder` as one commit; returns the commit URL.
    repo_type "space" creates a Gradio Space (export --space)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        sdk = {"space_sdk": "gradio"} if repo_type == "space" else {}
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, **sdk)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, repo_type=repo_type,
                                 commit_message=message, ignore_patterns=["manifest.json"])
    except Exception as e:
        if not _network_error(e):
            raise
        raise UserError(f"Pushing to {repo_id} on {api.endpoint} failed: {_first_line(e)}") from None
    return str(info.commit_url)


def push_checkpoint(ckpt: Path, repo_id: str, revision: str | None = None, private: bool = False) -> str:
    """Push a checkpoint's HF export: its `hf/` folder when it has one, else a fresh export in a temp dir."""
    ckpt = Path(ckpt)
    message = f"smoltrain: {ckpt.name}"
    if (ckpt / "hf" / "config.json").is_file():
        return push_folder(ckpt / "hf", repo_id, revision, private, message)
    from smoltrain.hf.interop import export_hf

    with tempfile.TemporaryDirectory(prefix="smoltrain-push-") as tmp:
        out = export_hf(ckpt, Path(tmp) / "export")
        return push_folder(out, repo_id, revision, private, message)


def stale_branches(names: list[str], keep_last: int, pushed: str) -> list[str]:
    """The step branches older than the newest `keep_last`, oldest first; `pushed` is never among them."""
    if keep_last <= 0:
        return []
    steps = sorted(n for n in names if STEP_BRANCH.fullmatch(n))  # 8 digits: name order is step order
    return [n for n in steps[:-keep_last] if n != pushed]


def retain_branches(repo_id: str, keep_last: int, pushed: str) -> list[str]:
    """checkpoint.keep_last on the Hub: delete the older step branches; returns the deleted names.

    Raises UserError naming what failed (and what was already deleted); the push itself stands.
    """
    if keep_last <= 0:
        return []
    from huggingface_hub import HfApi

    api = HfApi()
    deleted: list[str] = []
    try:
        refs = api.list_repo_refs(repo_id, repo_type="model")
        for name in stale_branches([b.name for b in refs.branches], keep_last, pushed):
            api.delete_branch(repo_id, branch=name, repo_type="model")
            deleted.append(name)
    except Exception as e:
        if not _network_error(e):
            raise
        done = f" after deleting {', '.join(deleted)}" if deleted else ""
        where = f"{repo_id} on {api.endpoint}"
        raise UserError(f"deleting old branches of {where} failed{done}: {_first_line(e)}") from None
    return deleted


def prune_after_push(repo_id: str, keep_last: int, pushed: str) -> list[str]:
    """The mirror's cleanup after a push: one line either way, never raised (the push already happened)."""
    try:
        deleted = retain_branches(repo_id, keep_last, pushed)
    except UserError as e:
        print(f"hub: {e} ({pushed} was pushed; the run goes on)", file=sys.stderr, flush=True)
        return []
    if deleted:
        names = ", ".join(deleted)
        print(f"hub: deleted branches {names} of {repo_id} (checkpoint.keep_last={keep_last})", flush=True)
    return deleted
