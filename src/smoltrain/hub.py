"""Publishing to the Hugging Face Hub: an HF export (weights, config, tokenizer, model card) as one commit.

huggingface_hub reads HF_TOKEN (or the token `hf auth login` saved) and HF_ENDPOINT (a mirror or a
private Hub) itself; we only check that a token exists before any work is done.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from smoltrain.errors import UserError


def check_token(repo_id: str) -> None:
    """Refuse before exporting or training when no Hub token is available: uploads need one."""
    from huggingface_hub import get_token

    if "/" not in repo_id or repo_id.count("/") > 1:
        raise UserError(f"Hub repo id must be NAMESPACE/NAME, got {repo_id!r}.")
    if not get_token():
        raise UserError(f"Pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN (a write token) or run "
                        "`hf auth login` first.")


def push_folder(folder: Path, repo_id: str, revision: str | None = None, private: bool = False,
                message: str = "Upload from smoltrain") -> str:
    """Create the repo (and branch) if needed, then upload `folder` as one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, repo_type="model",
                                 commit_message=message, ignore_patterns=["manifest.json"])
    except (HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"Pushing to {repo_id} on {api.endpoint} failed: {first}") from None
    return str(info.commit_url)


def push_checkpoint(ckpt: Path, repo_id: str, revision: str | None = None, private: bool = False) -> str:
    """Push a checkpoint's HF export: its `hf/` folder when it has one, else a fresh export in a temp dir."""
    ckpt = Path(ckpt)
    message = f"smoltrain: {ckpt.name}"
    if (ckpt / "hf" / "config.json").is_file():
        return push_folder(ckpt / "hf", repo_id, revision, private, message)
    from smoltrain.interop import export_hf

    with tempfile.TemporaryDirectory(prefix="smoltrain-push-") as tmp:
        out = export_hf(ckpt, Path(tmp) / "export")
        return push_folder(out, repo_id, revision, private, message)
