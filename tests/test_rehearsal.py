"""Rehearsals of the real shapes on CPU (#23 item 4): the shipped GPU recipes' models at seq_len 2048, from a
parquet corpus shaped like SmolLM-Corpus (a `text` column) through prepare, a save, a kill and a resume.

Micro batch 1 and two steps keep them to minutes; the model and its 49152-token tokenizer (the real SmolLM2
one, from the GGUF asset) are the recipes' own. The recipes ask for bf16 + compile, so these runs also show
the CPU fallback (fp32, eager) and its memory check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_corpus_text

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("smollm-corpus")
    docs = make_corpus_text(60, seed=7, words_per_doc=(300, 600))
    for i in range(3):  # several files, as a hub subset's shards are
        pq.write_table(pa.table({"text": docs[i::3], "id": list(range(i, 60, 3))}), root / f"train-{i:05d}.parquet")
    return root


def _sets(run: Path, corpus: Path, gguf: Path, steps: int, *extra: str) -> list[str]:
    pairs = [f"run.dir={run}", f"data.datasets=[{{name: corpus, sources: ['{corpus}']}}]", f"data.tokenizer={gguf}",
             "data.max_tokens=null", "data.val_fraction=0.1", "data.num_proc=1", f"train.max_steps={steps}",
             "train.micro_batch_size=1", "train.grad_accum_steps=1", "optim.warmup_steps=1", "checkpoint.every=1",
             "eval.every=0", "eval.prompts=[]", "eval.max_tokens=2048", "log.every=1", "log.progress=false",
             "log.tensorboard=false", *extra]
    return [x for p in pairs for x in ("--set", p)]


def _train(config: str, sets: list[str], env: dict | None = None, nproc: int = 0) -> subprocess.CompletedProcess:
    args = ["train", "--config", str(ROOT / "configs" / config), *sets]
    head = [sys.executable, "-m", "smoltrain"]
    if nproc:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "smoltrain"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([*head, *args], capture_output=True, text=True, timeout=1800, env=full_env)


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}


def test_135m_at_2048_trains_saves_is_killed_and_resumes_exactly(tmp_path, parquet_corpus, smollm2_gguf):
    # one uninterrupted pass over steps 1-2, killed inside the step-2 save; the resumed run redoes step 2 from
    # the step-1 checkpoint and must log the same loss (a separate reference run would cost minutes more)
    run = tmp_path / "run"
    sets = _sets(run, parquet_corpus, smollm2_gguf, 2, "eval.max_tokens=256")  # the final eval: one short window
    proc = _train("smollm2-135m.yaml", sets, env={"SMOLTRAIN_FAULT": "in_save=2"})
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "bf16 -> fp32" in proc.stdout and "Tokens planned vs available" in proc.stdout
    assert (run / "checkpoints" / "step_00000001").is_dir()
    assert not (run / "checkpoints" / "step_00000002").exists()
    uninterrupted = _losses(run)
    assert sorted(uninterrupted) == [1, 2]
    proc = _train("smollm2-135m.yaml", sets)
    assert proc.returncode == 0 and "(step 1)" in proc.stdout, proc.stderr[-3000:]
    assert _losses(run) == uninterrupted  # (plan's exact count of prepared tokens: tests/test_plan.py)


def test_360m_at_2048_trains_one_step(tmp_path, parquet_corpus, smollm2_gguf):
    run = tmp_path / "r"
    proc = _train("smollm2-360m.yaml", _sets(run, parquet_corpus, smollm2_gguf, 1, "eval.max_tokens=256"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000001" / "manifest.json").exists() and len(_losses(run)) == 1


def test_135m_fsdp_over_two_gloo_processes_reshards_onto_one(tmp_path, parquet_corpus, smollm2_gguf):
    fsdp = tmp_path / "fsdp"
    # the 135M shape (sharding, resharding) at seq_len 256: the 2048-token step is rehearsed above
    common = ("train.global_batch_size=2", "train.seq_len=256", "eval.max_tokens=512",
              f"run.data_dir={tmp_path / 'data'}")
    proc = _train("smollm2-135m.yaml", _sets(fsdp, parquet_corpus, smollm2_gguf, 2, "parallel.strategy=fsdp",
                                              *common), env={"OMP_NUM_THREADS": "1"}, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    src = fsdp / "checkpoints" / "step_00000001"
    one = tmp_path / "one"
    proc = _train("smollm2-135m.yaml", _sets(one, parquet_corpus, smollm2_gguf, 2, f"train.resume_from={src}",
                                             *common))
    assert proc.returncode == 0 and "(step 1)" in proc.stdout, proc.stderr[-3000:]
    assert abs(_losses(one)[2] - _losses(fsdp)[2]) < 1e-4
