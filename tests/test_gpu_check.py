"""bench/gpu_check.py's CPU dry run, so the GPU check cannot rot between GPU machines (#23 item 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path, smollm2_gguf, real_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "smollm2-ckpt").symlink_to(real_ckpt)  # the session's import (greedy_text imports only when absent)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(out), "--assets", str(smollm2_gguf.parent)],
                          capture_output=True, text=True, timeout=1200)
    results = json.loads((out / "gpu_check.json").read_text())
    failed = {k: v for k, v in results.items() if isinstance(v, dict) and not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-2000:])
    assert results["throughput"]["eager"]["tokens_per_sec"] > 0
    assert results["kill_resume"]["max_loss_diff"] <= 1e-2 and results["greedy_text"]["text"]
    assert (out / "gpu_check.log").stat().st_size > 0
