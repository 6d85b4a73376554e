"""AdamW with SmolLM2's parameter groups (or Muon + AdamW), and learning-rate schedules as pure
functions of the step.

The schedule keeps no state of its own: lr_at(step) is recomputed from the config, so a resumed run
(or one whose max_steps was raised, or a WSD cooldown branched from a stable-phase checkpoint) gets
exactly the learning rate the config says, with nothing to drift.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoltrain.config import OptimConfig
from smoltrain.errors import UserError


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on 2-d projection weights; optionally none on norms and the (tied) embedding.

    Decaying RMSNorm gains pulls them toward 0 (not their init of 1), and decaying a tied
    embedding shrinks the input and output vocabulary together; most LLM recipes exclude both.
    """
    decay = []
    no_decay = []
    for name, p in model.named_parameters():  # a tied weight appears once
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embed_tokens" in name or name.startswith("lm_head")
        (no_decay if cfg.no_decay_norms_and_embeddings and exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-d weight inside the decoder (attention and MLP projections): what Muon orthogonalizes.

    The embedding, the (tied) head and the norms' gains stay with AdamW, as in Keller Jordan's Muon.
    """
    return p.ndim == 2 and "embed_tokens" not in name and not name.startswith("lm_head")


def run_closure(closure) -> torch.Tensor | None:  # noqa: ANN001 (torch's closure type)
    """An optimizer's optional closure, run with gradients on (torch's step protocol)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (torch.optim.Muon's, Keller Jordan's) in `dtype`: the nearest
    semi-orthogonal matrix, roughly, of a 2-d update, returned in that dtype."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class CpuMuon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in fp32 rather than bf16, for CPU runs.

    A CPU without bf16 matrix units (AVX2: AMD EPYC, older Xeons) multiplies bf16 20-30x slower than fp32
    (a 128 x 384 iteration: 59 ms vs 2.8 ms on AMD EPYC), which made the quickstart's 560 steps take 18.5 min
    there instead of ~5. The state (momentum_buffer) and every other step of the update are torch's, so
    checkpoints move freely between this and torch.optim.Muon (the GPU path, which keeps bf16).
    """

    ns_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = run_closure(closure)
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * muon_lr_ratio(group["adjust_lr_fn"], p.shape))
        return loss


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning-rate scale for a (rows, cols) weight, as torch.optim.Muon computes it."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the hidden matrices and torch.optim.AdamW for everything else, as one optimizer.

    Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/, used by the modded-nanogpt speedrun)
    takes SGD-momentum's update (Nesterov) and replaces it by the nearest semi-orthogonal matrix (5
    Newton-Schulz steps in bf16 on GPU, fp32 on CPU: CpuMuon), scaled by sqrt(max(1, rows / cols)). The
    two torch optimizers share this object's param groups (the same dicts) and its `state`, so the trainer, GradScaler and DCP's
    get/set_optimizer_state_dict see one ordinary optimizer whose state_dict() holds only tensors per
    parameter (Muon: momentum_buffer; AdamW: step, exp_avg, exp_avg_sq) and numbers per group.
    Groups of the Muon part carry "muon": True, which set_lr reads.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self._parts = (muon, adamw)
        self._num_muon_groups = len(muon.param_groups)
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        muon, adamw = self._parts
        muon.param_groups = self.param_groups[: self._num_muon_groups]
        adamw.param_groups = self.param_groups[self._num_muon_groups :]
        muon.state = adamw.state = self.state  # parameters are disjoint: one mapping serves both

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and self.param_groups...
        self._share()  # ...so the parts are pointed at the new ones

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = run_closure(closure)
        for part in self._parts:
            part.step()
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA, foreach elsewhere; bitsandbytes AdamW8bit when asked), or Muon + AdamW."""
    if cfg.name == "muon":
        return build_muon(model, cfg, device)
    groups = param_groups(model, cfg)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.eight_bit:
        if device.type != "cuda":
            raise UserError("optim.eight_bit needs CUDA (bitsandbytes AdamW8bit); set it false on this device.")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.eight_bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw, **_adamw_kernel(device))


def _adamw_kernel(device: torch.device) -> dict:
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_muon(model: nn.Module, cfg: OptimConfig, device: torch.device) -> MuonAdamW:
    """Muon (optim.muon_*) for the hidden matrices; AdamW (optim.lr, betas, weight_decay) for the rest."""
    hidden = [p for n, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(n, p)]
    hidden_ids = {id(p) for p in hidden}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden_ids]} for g in param_groups(model, cfg)]
    rest = [g for g in rest if g["params"]]
    muon_class = torch.optim.Muon if device.type == "cuda" else CpuMuon
    muon = muon_class([{"params": hidden, "muon": True}], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                      weight_decay=cfg.muon_weight_decay, nesterov=True, adjust_lr_fn=cfg.muon_adjust_lr)
    adamw = torch.optim.AdamW(rest, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **_adamw_kernel(device))
    return MuonAdamW(muon, adamw)


def rewarm_factor(step: int, rewarm_from: int | None, rewarmup_steps: int) -> float:
    """A linear ramp 1/k, 2/k, ... 1 over `rewarmup_steps` updates after an extended run resumed.

    Extending a finished WSD run (max_steps raised) jumps the LR from its decayed floor back to the
    stable phase's peak; re-warming eases that jump. `rewarm_from` is saved in every checkpoint, so a
    resumed extension gets the same factor at every step.
    """
    if rewarm_from is None or rewarmup_steps <= 0:
        return 1.0
    return min(1.0, (step - rewarm_from + 1) / rewarmup_steps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for update number `step` (0-based).

    warmup: linear from lr/warmup to lr over `warmup_steps`. Then
    - constant: lr;  cosine / linear: from lr to min_lr over the remaining steps up to max_steps;
    - wsd: lr until decay_start_step (default 80% of max_steps), then decay to min_lr over
      decay_steps (default: until max_steps) with decay_style linear | cosine | 1-sqrt, then min_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        start = cfg.decay_start_step if cfg.decay_start_step is not None else int(0.8 * max_steps)
        start = max(start, cfg.warmup_steps)
        length = cfg.decay_steps if cfg.decay_steps is not None else max_steps - start
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start + 1) / max(1, length))
        style = cfg.decay_style
    else:
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps + 1) / span)
        style = cfg.schedule
    if style == "cosine":
        frac = 0.5 * (1 + math.cos(math.pi * progress))
    elif style == "1-sqrt":
        frac = 1 - math.sqrt(progress)
    else:
        frac = 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> None:
    """AdamW groups get `lr`; Muon groups get optim.muon_lr scaled by the same schedule (lr / optim.lr)."""
    scale = lr / cfg.lr
    for g in optimizer.param_groups:
        g["lr"] = cfg.muon_lr * scale if g.get("muon") else lr
