"""Multiple-choice scoring speed: `smoltrain eval --tasks` vs lm-evaluation-harness, same model, same items.

    python bench/tasks.py --task FILE.jsonl [--ckpt CKPT] [--limit 100] [--rounds 2] [--out bench/results.jsonl]

Without --ckpt it imports the real SmolLM2-135M-Instruct from the asset cache (smoltrain assets) and
exports it, so lm-eval's `hf` model reads the very same weights. Each measurement runs in a fresh
subprocess, the two sides interleaved in ABBA order. Timed: scoring only, model loading left out. For
smoltrain, encoding and scoring every item (score_task); for lm-eval, `HFLM.loglikelihood` on the requests
its own task pipeline built from the file (a custom local task), which leaves lm-eval's task set-up out,
in its favour. Both sides must give the same acc and acc_norm, else the comparison is void.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, interleaved, reference_checkpoint  # noqa: E402


def lm_eval_task(task_file: str) -> dict:
    return {"task": "smoltrain_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": task_file}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}


def run_smoltrain(a) -> tuple[float, dict]:
    from smoltrain.eval.tasks import load_scorer, load_task, score_task

    scorer, tok, _ = load_scorer(a.ckpt, torch.device("cpu"))
    t = time.perf_counter()
    scores = score_task(scorer, tok, load_task(a.task, a.limit))
    return time.perf_counter() - t, scores


def run_lm_eval(a) -> tuple[float, dict]:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=a.hf_dir, device="cpu", dtype="float32", batch_size=a.batch_size)
    task = next(iter(TaskManager().load([lm_eval_task(a.task)])["tasks"].values()))
    task.build_all_requests(limit=a.limit, rank=0, world_size=1)
    t = time.perf_counter()
    resps = lm.loglikelihood(task.instances, disable_tqdm=True)
    seconds = time.perf_counter() - t
    by_doc: dict[int, list] = {}
    for inst, r in zip(task.instances, resps):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, r))
    acc = acc_norm = 0
    docs = {inst.doc_id: inst.doc for inst in task.instances}
    for doc_id, rs in by_doc.items():
        res = task.process_results(docs[doc_id], [r for _, r in sorted(rs, key=lambda x: x[0])])
        acc, acc_norm = acc + res["acc"], acc_norm + res["acc_norm"]
    n = len(by_doc)
    return seconds, {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def worker(a) -> None:
    seconds, scores = (run_smoltrain if a.worker == "smoltrain" else run_lm_eval)(a)
    print(json.dumps({"seconds": seconds, "items_per_sec": scores["n"] / seconds, **scores}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="JSONL task file ({context, choices, label} a line)")
    ap.add_argument("--ckpt")
    ap.add_argument("--limit", type=int, default=100, help="items scored per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval HFLM batch size")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, hf_dir = reference_checkpoint(a.ckpt, Path(tmp))
        common = [sys.executable, __file__, "--task", str(Path(a.task).resolve()), "--ckpt", str(ckpt),
                  "--hf-dir", str(hf_dir), "--limit", str(a.limit), "--batch-size", str(a.batch_size)]
        runs = interleaved(common, ["smoltrain", "lm-eval"], a.rounds)
    scores = {k: (v[0]["acc"], v[0]["acc_norm"], v[0]["n"]) for k, v in runs.items()}
    same = len(set(scores.values())) == 1
    med = {k: statistics.median(r["items_per_sec"] for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        emit({"bench": "tasks", "impl": k, "items_per_sec": round(med[k], 3), "items": v[0]["n"],
              "acc": v[0]["acc"], "acc_norm": v[0]["acc_norm"], "same_scores": same, "task": Path(a.task).name,
              "rounds": [round(r["items_per_sec"], 3) for r in v]}, a.out)
    ratio = med["smoltrain"] / med["lm-eval"]
    print(f"smoltrain {med['smoltrain']:.2f} items/s ({60 * med['smoltrain']:.0f}/min), lm-eval "
          f"{med['lm-eval']:.2f} items/s, ratio {ratio:.2f}x; acc/acc_norm/n {scores}; same scores: {same}")
    if not same:
        sys.exit("The two sides gave different scores: the comparison is void.")


if __name__ == "__main__":
    main()
