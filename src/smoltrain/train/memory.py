"""Memory of one training step, measured without allocating it: the real model, optimizer and fused loss
run under torch's FakeTensorMode while a dispatch mode adds up the bytes of every storage alive.

This is torchtitan's estimation idea (scripts/estimate: one step under fake tensors with MemTracker), written
small: torch's MemTracker keeps per-module snapshots and took minutes for the 135M model, while counting live
storages takes seconds. The step is the trainer's: forward with the fused chunked loss, backward, gradient
clipping, the optimizer step and zero_grad(set_to_none), on the CPU device (fake tensors need no memory and
no GPU). bf16 autocast is CPU autocast, whose lower-precision op list covers the same matmuls and attention
as CUDA's. The peak is the tensors' bytes; a CUDA process adds its context and the caching allocator's slack
(`fits` budgets for both). BENCHMARKS.md states the error against real peaks measured on CPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from smoltrain.config import OptimConfig
from smoltrain.model.config import ModelConfig
from smoltrain.model.loss import GPU_CHUNK

GIB = 2**30
CUDA_CONTEXT = 1.0 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers: an assumption, not measured
ALLOCATOR_SLACK = 1.10  # the caching allocator's fragmentation on top of the tensors' peak: an assumption


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage an op creates while alive, and their peak (from `start` bytes on)."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.live = start
        self.peak = start
        self._seen = WeakIdKeyDictionary()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen:
            return
        nbytes = st.nbytes()
        self._seen[st] = nbytes
        weakref.finalize(st, self._free, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@dataclass(frozen=True)
class StepMemory:
    """One process's bytes for a training step (single device; `per_gpu` derives DDP and FSDP from it)."""

    weights: int  # fp32 parameters (autocast keeps fp32 masters)
    grads: int
    optimizer: int  # optimizer state after its first step
    activations: int  # what the forward pass leaves for the backward pass
    loss_buffer: int  # the fused loss's (chunk, V) logits block(s), part of the peak
    peak_fwd_bwd: int  # peak while the forward and backward run (optimizer state alive)
    peak_opt: int  # peak during the optimizer step
    per_row: int  # growth of the forward/backward peak per extra sequence in the micro batch
    micro_batch: int
    largest_layer: int  # bytes of the largest decoder layer's parameters (what FSDP gathers at a time)
    root: int  # bytes of the parameters outside the decoder layers (embedding, final norm, untied head)

    @property
    def peak(self) -> int:
        return max(self.peak_fwd_bwd, self.peak_opt)

    def at(self, micro_batch: int) -> StepMemory:
        """The same step at another micro batch: activations and the forward/backward peak grow linearly
        (measured at two batch sizes); weights, gradients and optimizer state do not change."""
        d = micro_batch - self.micro_batch
        act = self.activations * micro_batch // self.micro_batch
        return replace(self, micro_batch=micro_batch, activations=act,
                       peak_fwd_bwd=max(self.peak_fwd_bwd + d * self.per_row, self.weights + self.optimizer))


def eight_bit_state(model: torch.nn.Module) -> int:
    """bitsandbytes AdamW8bit's state: two uint8 moments per element with one fp32 absmax per 256-element
    block each, for tensors of >= 4096 elements; smaller ones keep fp32 moments (its min_8bit_size)."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        total += 2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 8 * n
    return total


def _fwd_bwd(model: torch.nn.Module, tracker: LiveBytes, rows: int, seq_len: int, amp: bool,
             chunk: int) -> tuple[int, int]:
    """(peak, bytes the forward pass kept for backward) of one forward + backward on `rows` sequences."""
    batch = torch.randint(0, model.config.vocab_size, (rows, seq_len + 1))
    tracker.reset_peak()
    before = tracker.live
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = model(batch[:, :-1], labels=batch[:, 1:], loss_chunk=chunk, reduction="sum") / (rows * seq_len)
    kept = tracker.live - before
    loss.backward()
    return tracker.peak, kept


def measure_step(model_cfg: ModelConfig, optim: OptimConfig, micro_batch: int, seq_len: int, amp: bool,
                 activation_checkpointing: bool, loss_chunk: int | str) -> StepMemory:
    """Run the trainer's step on fake tensors at `micro_batch` (twice: the second has optimizer state) and
    the forward/backward once more at twice the batch, for the slope."""
    return measure_steps(model_cfg, optim, micro_batch, seq_len, amp, (activation_checkpointing,), loss_chunk)[0]


SMALL_DEPTHS = (2, 3)  # the depths measured whole when a deeper model is extrapolated
AFFINE = ("weights", "grads", "optimizer", "activations", "peak_fwd_bwd", "per_row", "root")  # linear in depth


def measure_steps(model_cfg: ModelConfig, optim: OptimConfig, micro_batch: int, seq_len: int, amp: bool,
                  checkpointing: tuple[bool, ...], loss_chunk: int | str) -> list[StepMemory]:
    """measure_step for each activation checkpointing setting in `checkpointing`.

    Without checkpointing every byte count of the forward and backward is affine in the depth (identical
    layers; the peak is where all of them hold their activations), so a deep model is measured at 2 and 3
    layers and extrapolated: byte-exact against the whole-model measurement for the 135M, 360M and 1.7B
    presets, in seconds instead of half a minute. With checkpointing the peak moves (loss, recompute or
    gradients; 1.7B's would be 9% low), so that setting is measured on the whole model. The optimizer
    step's peak follows how foreach groups the tensors, so it too is measured on the whole model (cheap)."""
    depth = model_cfg.num_hidden_layers
    if depth <= SMALL_DEPTHS[-1] or all(checkpointing):
        return _measure(model_cfg, optim, micro_batch, seq_len, amp, checkpointing, loss_chunk)
    lo, hi = (_measure(model_cfg.replace(num_hidden_layers=n), optim, micro_batch, seq_len, amp, (False,),
                       loss_chunk)[0] for n in SMALL_DEPTHS)
    # what the forward/backward leaves alive at the optimizer step (the tied embedding's second gradient),
    # the same at any depth
    left = lo.peak_opt - _optimizer_peak(model_cfg.replace(num_hidden_layers=SMALL_DEPTHS[0]), optim)
    grown = {f: getattr(lo, f) + (getattr(hi, f) - getattr(lo, f)) * (depth - SMALL_DEPTHS[0]) for f in AFFINE}
    plain = replace(lo, **grown, peak_opt=_optimizer_peak(model_cfg, optim) + left)
    whole = None
    if any(checkpointing):
        whole = _measure(model_cfg, optim, micro_batch, seq_len, amp, (True,), loss_chunk)[0]
    return [whole if c else plain for c in checkpointing]


def _optimizer_peak(model_cfg: ModelConfig, optim: OptimConfig) -> int:
    """Peak bytes of the whole model's clip + optimizer step (the second, with state), on zero gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from smoltrain.model.llama import SmolLM2
    from smoltrain.train.optim import build_optimizer

    with FakeTensorMode():
        model = SmolLM2(model_cfg)
        model.init_rope()
        weights = sum(p.nbytes for p in model.parameters())
        optimizer = build_optimizer(model, replace(optim, eight_bit=False), torch.device("cpu"))
        with LiveBytes(weights + sum(b.nbytes for b in model.buffers())) as tracker:
            for _ in range(2):
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
                peak = _optimizer_step(model, optimizer, tracker)
    return peak + (eight_bit_state(model) - _state_bytes(optimizer) if optim.eight_bit else 0)


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tracker: LiveBytes) -> int:
    """The trainer's clip + step + zero_grad; returns the peak bytes while the step ran."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    tracker.reset_peak()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def _measure(model_cfg: ModelConfig, optim: OptimConfig, micro_batch: int, seq_len: int, amp: bool,
             checkpointing: tuple[bool, ...], loss_chunk: int | str) -> list[StepMemory]:
    """measure_step for each activation checkpointing setting in `checkpointing`, on one fake model: the
    later settings reuse the first one's gradients and optimizer state (they do not depend on it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from smoltrain.model.llama import SmolLM2
    from smoltrain.train.optim import build_optimizer

    chunk = GPU_CHUNK if loss_chunk == "auto" else loss_chunk  # what a GPU run uses; CPU 'auto' is smaller
    with FakeTensorMode():
        model = SmolLM2(model_cfg)
        model.init_rope()
        model.train()
        model.gradient_checkpointing = checkpointing[0]
        weights = sum(p.nbytes for p in model.parameters())
        layer = max(sum(p.nbytes for p in m.parameters()) for m in model.model.layers)
        optimizer = build_optimizer(model, replace(optim, eight_bit=False), torch.device("cpu"))
        with LiveBytes(weights + sum(b.nbytes for b in model.buffers())) as tracker:
            peaks = []
            for _ in range(2):
                peak_fb, kept = _fwd_bwd(model, tracker, micro_batch, seq_len, amp, chunk)
                peaks.append(peak_fb)
                grads = sum(p.grad.nbytes for p in model.parameters())
                peak_opt = _optimizer_step(model, optimizer, tracker)
            state = _state_bytes(optimizer)
            runs = []
            for i, ac in enumerate(checkpointing):
                model.gradient_checkpointing = ac
                if i:
                    peaks[1], kept = _fwd_bwd(model, tracker, micro_batch, seq_len, amp, chunk)
                model.zero_grad(set_to_none=True)
                double, _ = _fwd_bwd(model, tracker, 2 * micro_batch, seq_len, amp, chunk)
                model.zero_grad(set_to_none=True)
                runs.append((peaks[1], kept, double))
    rows = min(chunk, micro_batch * seq_len) if chunk else micro_batch * seq_len
    buffer = rows * model_cfg.vocab_size * (4 + (2 if amp else 0))
    extra = eight_bit_state(model) - state if optim.eight_bit else 0
    return [StepMemory(weights=weights, grads=grads, optimizer=state + extra, activations=kept, loss_buffer=buffer,
                       peak_fwd_bwd=peak + extra, peak_opt=peak_opt + extra,
                       per_row=max(0, (double - peak) // micro_batch), micro_batch=micro_batch,
                       largest_layer=layer, root=weights - layer * model_cfg.num_hidden_layers)
            for peak, kept, double in runs]


def per_gpu(m: StepMemory, strategy: str, world: int) -> dict[str, int]:
    """Bytes per GPU by part under `strategy` over `world` GPUs, derived from the single-device step.

    ddp: every GPU holds the whole step, plus DDP's gradient buckets (one more copy of the gradients).
    fsdp (FSDP2 fully_shard per decoder layer and at the root, as distributed.wrap does): weights,
    gradients and optimizer state are sharded 1/world; each GPU also holds the root's parameters whole
    (the root is not resharded after forward) and two gathered decoder layers with their unsharded
    gradients (the one computing and the one prefetched). Not measured: derived from the parts above.
    """
    shared = m.peak_fwd_bwd - m.weights - m.optimizer  # activations, gradients, loss block, temporaries
    if strategy != "fsdp" or world == 1:
        extra = m.grads if strategy == "ddp" and world > 1 else 0
        return {"weights": m.weights, "grads": m.grads + extra, "optimizer": m.optimizer,
                "activations": m.activations, "loss_buffer": m.loss_buffer, "peak": m.peak + extra}
    gathered = m.root + 2 * m.largest_layer
    shard = (m.weights + m.optimizer) // world
    grads = m.grads // world + gathered
    peak_fb = shard + gathered + (shared - m.grads) + grads
    peak_opt = (m.peak_opt - m.weights - m.optimizer - m.grads) // world + shard + m.grads // world
    return {"weights": m.weights // world + gathered, "grads": grads, "optimizer": m.optimizer // world,
            "activations": m.activations, "loss_buffer": m.loss_buffer, "peak": max(peak_fb, peak_opt)}


def fits(peak: int, gpu_bytes: int) -> bool:
    """Whether a step whose tensors peak at `peak` runs on a GPU of `gpu_bytes` (context and slack included)."""
    return peak * ALLOCATOR_SLACK + CUDA_CONTEXT <= gpu_bytes
