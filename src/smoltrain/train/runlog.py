"""Throughput, FLOPs and MFU, and the run's logs: console progress, metrics.jsonl, TensorBoard, wandb, trackio."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import torch

from smoltrain.faults import fault_point
from smoltrain.model.config import ModelConfig
from smoltrain.storage import publish_file, rewrite_jsonl

# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA datasheets; GeForce cards at fp32 accumulate
# (what PyTorch's bf16 matmuls use). Sparse figures are never a fair MFU denominator.
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100 PCIe": 756e12,
    "H100": 989.5e12,  # SXM (HBM3)
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,  # A10 datasheet: the AWS A10G is the same GA102 part
    "A10": 125e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak for this dtype, or None where unknown (CPU, MPS, unlisted GPUs, fp32)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return flops
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM / nanoGPT convention: 6 * N + 12 * L * H * Q * T.

    N counts the matmul weights a token passes through: every projection (GQA's smaller k/v
    projections at their real size) plus the LM head once, whether tied or not; the embedding
    lookup costs no FLOPs. 12 * L * H * Q * T is attention's QK^T and AV (forward + backward),
    with H query heads of size Q and context T, not halved for the causal mask (as PaLM).
    """
    d = cfg.hidden_size
    f = cfg.intermediate_size
    h = cfg.num_attention_heads
    k = cfg.num_key_value_heads
    q = cfg.head_dim
    per_layer = d * h * q * 2 + d * k * q * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    n = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size  # + LM head
    return 6 * n + 12 * cfg.num_hidden_layers * h * q * seq_len


def model_flops_utilization(cfg: ModelConfig, seq_len: int, tokens_per_sec: float, device: torch.device,
                            dtype: torch.dtype, world_size: int = 1) -> float | None:
    """Achieved over peak FLOP/s (all devices together); None where the device's peak is unknown."""
    peak = peak_flops(device, dtype)
    return flops_per_token(cfg, seq_len) * tokens_per_sec / (peak * world_size) if peak else None


class RunLog:
    """Appends events to RUN/metrics.jsonl and mirrors scalars to TensorBoard / wandb (rank 0 only)."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb_project: str | None,
                 config: dict[str, Any], trackio_project: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        for p in (self.path, self.samples_path):
            rewind_jsonl(p, resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events after the resumed step, as if the run had never stopped
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None
        self.wandb = wandb_run(Path(run_dir), wandb_project, config) if wandb_project else None
        self.trackio = trackio_run(Path(run_dir), trackio_project, config) if trackio_project else None
        self._sample_rows: list[list] = []

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            fault_point("in_log", record.get("step", 0))  # tests: a disk that fills while logging
            f.write(json.dumps(clean) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step" and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.trackio is not None:
            self.trackio.log(scalars, step=step)

    def sample(self, record: dict[str, Any]) -> None:
        with open(self.samples_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.add_text(f"samples/{record['mode']}/{record['prompt'][:40]}", record["text"], record["step"])
        self._sample_rows.append([record["step"], record["mode"], record["prompt"], record["text"]])

    def samples_done(self, step: int) -> None:
        """One wandb table per sampling round (every prompt, greedy and sampled), at that step."""
        if self.wandb is not None and self._sample_rows:
            import wandb

            table = wandb.Table(columns=["step", "mode", "prompt", "text"], data=self._sample_rows)
            self.wandb.log({"samples": table}, step=step)
        if self.trackio is not None and self._sample_rows:
            import trackio

            self.trackio.log({"samples": trackio.Table(columns=["step", "mode", "prompt", "text"],
                                                       data=self._sample_rows)}, step=step)
        self._sample_rows = []

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.trackio is not None:
            self.trackio.finish()


def wandb_run(run_dir: Path, project: str, config: dict[str, Any]):
    """wandb.init that continues the same wandb run on every resume: its id is kept in RUN/wandb.json.

    Online or offline (WANDB_MODE=offline, then `wandb sync RUN/wandb/offline-run-*`). Steps a killed
    segment logged past its checkpoint are not rewritten (wandb keeps steps monotonic); an exact resume
    logs the same values for them anyway.
    """
    try:
        import wandb
    except ImportError:
        from smoltrain.errors import UserError

        raise UserError("log.wandb_project is set but wandb is not installed: pip install 'smoltrain[wandb]'") from None
    run_id = kept_id(run_dir / "wandb.json", uuid.uuid4().hex[:8], project)  # wandb ids: [a-z0-9]
    return wandb.init(project=project, id=run_id, resume="allow", config=config, dir=str(run_dir),
                      name=run_dir.name)


def trackio_run(run_dir: Path, project: str, config: dict[str, Any]):
    """trackio (local-first, SQLite under TRACKIO_DIR or ~/.cache/huggingface/trackio; `trackio show`):
    one trackio run per run dir, resumed by the name kept in RUN/trackio.json."""
    try:
        import trackio
    except ImportError:
        from smoltrain.errors import UserError

        raise UserError("log.trackio_project is set but trackio is not installed: pip install trackio") from None
    name = kept_id(run_dir / "trackio.json", f"{run_dir.name}-{uuid.uuid4().hex[:6]}", project)
    return trackio.init(project=project, name=name, config=config, resume="allow", embed=False,
                        auto_log_cpu=False, auto_log_gpu=False)


def kept_id(path: Path, new: str, project: str) -> str:
    """The tracker run id recorded in `path`, or `new`, recorded there first (mirrored with the logs)."""
    try:
        return json.loads(path.read_text())["id"]
    except (OSError, ValueError, KeyError):
        path.parent.mkdir(parents=True, exist_ok=True)
        publish_file(path, json.dumps({"id": new, "project": project}) + "\n")
        return new


def rewind_jsonl(path: Path, step: int) -> None:
    """Keep only the records with step <= `step` (a resumed run continues its history seamlessly)."""
    if path.exists():
        rewrite_jsonl(path, lambda r: r.get("step", 0) <= step)


def memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
