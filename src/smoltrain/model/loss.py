"""Cross-entropy through the LM head without materialising the full (N, V) logits.

With a 49152-token vocabulary the logits of a (16 x 2048) batch are 6.4 GB in fp32; the plain loss also
keeps them (and their softmax) alive for the backward pass. Here the head matmul, log-softmax and the
gradients of h and W are computed `chunk` rows at a time *in the forward pass* (the Liger /
cut-cross-entropy idea), so peak memory is one (chunk, V) block and nothing is recomputed in backward.
The loss equals F.cross_entropy(h @ W.T, labels) up to float summation order.
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, chunk: int, ignore_index: int, mean: bool, need_grad: bool):
        # h (N, D) hidden states, w (V, D) head weight, labels (N,)
        valid = labels != ignore_index
        # The ignored rows are masked by multiplying with `keep` (1.0 or 0.0), never by a host-side branch or a
        # boolean index: no device sync and no data-dependent shape, so the step compiles to one graph; on a
        # packed batch every factor is 1.0 and the results are bit-identical to the unmasked arithmetic.
        keep = valid.to(torch.float32)
        safe = torch.where(valid, labels, 0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        buf = None  # one (chunk, V) block reused by every chunk: big fresh allocations page-fault each time
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            yc = safe[s : s + chunk]
            kc = keep[s : s + chunk]
            c = hc.shape[0]
            if hc.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
                buf = torch.empty(min(chunk, h.shape[0]), w.shape[0], device=h.device) if buf is None else buf
                logits = torch.mm(hc, w.t(), out=buf[:c])  # (C, V)
            else:
                logits = (hc @ w.t()).float()
            target = logits.gather(1, yc[:, None]).squeeze(1)  # (C,)
            row_max = logits.amax(dim=-1)
            e = logits.sub_(row_max[:, None]).exp_()  # in place: the logits are not needed again
            row_sum = e.sum(dim=-1)
            nll = row_max + row_sum.log() - target
            total += (nll * kc).sum()
            if need_grad:  # d loss / d logits = e / row_sum - onehot, folded into the two matmuls
                inv = row_sum.reciprocal() * kc
                ed = e.to(h.dtype)
                onehot_w = w[yc] * kc[:, None].to(w.dtype)  # (C, D): the -1 at each label
                grad_h[s : s + c] = (ed @ w) * inv[:, None].to(h.dtype) - onehot_w
                grad_w.addmm_(ed.t().float(), (hc.float() * inv[:, None]))
                grad_w.index_add_(0, yc, hc.float() * -kc[:, None])
        scale = 1.0 / valid.sum().float() if mean else torch.ones((), device=h.device)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(w.dtype), scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, scale = ctx.saved_tensors
        g = grad_out * scale
        return grad_h * g.to(grad_h.dtype), grad_w * g.to(grad_w.dtype), None, None, None, None, None


CPU_BLOCK_BYTES = 16 * 2**20  # target size of one (chunk, V) fp32 logits block on CPU
GPU_CHUNK = 4096  # rows per chunk on accelerators: memory-bound there, and 4096 keeps the matmuls large


def auto_chunk(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """The fused loss's chunk when train.loss_chunk is 'auto' (the default), for this shape and device.

    On CPU the time goes into passes over the (chunk, V) logits block (max, exp, sum, two gradient
    products): a block of a few tens of MB stays in cache between passes, while one over the whole
    batch streams hundreds of MB from memory each pass. On the issue-6 shape (2048 tokens x 49152) the
    loss took ~575 ms at chunk 256 vs ~800 ms at 2048 (BENCHMARKS.md). Rows are a power of two in
    [256, 4096]; never more than the batch has.
    """
    if device.type != "cpu":
        return min(GPU_CHUNK, num_rows)
    rows = max(256, min(4096, CPU_BLOCK_BYTES // (4 * vocab_size)))
    return min(1 << (rows.bit_length() - 1), num_rows)


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int = 4096,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `h @ w.T` against `labels` (mean or sum over labels != ignore_index; "none": the
    (N,) per-token losses, 0 at ignored labels, without gradients: what evaluation needs)."""
    assert reduction in ("mean", "sum", "none"), reduction
    need_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    if reduction == "none":
        assert not need_grad, "reduction='none' is for evaluation (no gradients)"
        return _token_losses(h, w, labels, chunk, ignore_index)
    return _ChunkedLinearCrossEntropy.apply(h, w, labels, chunk, ignore_index, reduction == "mean", need_grad)


def _token_losses(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int,
                  ignore_index: int) -> torch.Tensor:
    out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s : s + chunk] @ w.t()).float()  # (C, V)
        out[s : s + chunk] = torch.nn.functional.cross_entropy(logits, labels[s : s + chunk],
                                                               ignore_index=ignore_index, reduction="none")
    return out
