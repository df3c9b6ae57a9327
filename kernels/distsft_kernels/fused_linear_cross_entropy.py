"""Fused LM head + cross-entropy: the loss of `hidden @ weight.T (+ bias)` without the (N, V) logits.

Forward, over chunks of C tokens (C * V logits at a time, a few hundred MiB):
    logits_c = h_c @ W.T (+ b)                 (C, V), input dtype, cuBLAS with fp32 accumulation
    loss_c, dz_c = cross_entropy(logits_c)     our Triton CE kernel; dz_c written over logits_c
    dh_c  = dz_c @ W                           (C, d)  when hidden requires grad
    dW   += dz_c.T @ h_c                       (V, d)  when weight requires grad (accumulated in W's dtype)
    db   += sum_rows dz_c                      (V,)    fp32, when bias requires grad
The gradients are computed during the forward (Liger's scheme); backward only scales them by the
incoming grad_output. Frozen head (LoRA): only dh, i.e. two matmuls of 2 N d V flops each.

Shapes: hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) already shifted (targets[i] is the
label of row i; ignore_index rows count for nothing). Returns (loss_sum fp32 scalar, n_valid int64 scalar),
the sum for a trainer that normalises by a global token count. Soft-capping and label smoothing as in
`cross_entropy`. Under autocast the inputs are cast to the autocast dtype, as `F.linear` would be.
Saved for backward: the precomputed gradients only; `weight` is not kept, so this is safe inside a module
forward where DeepSpeed ZeRO-3 has gathered `lm_head.weight` (the gathered copy can be released).
"""

from __future__ import annotations

import torch

from ._common import INTERPRETED
from .cross_entropy import cross_entropy_launch

_CHUNK_BYTES = 1 << 29  # logits of one chunk: 512 MiB


def _chunk_rows(n_rows: int, vocab: int, elem_size: int) -> int:
    if INTERPRETED:
        return max(1, min(n_rows, 8))
    rows = max(64, (_CHUNK_BYTES // (vocab * elem_size)) // 64 * 64)
    return min(n_rows, rows)


def flce_forward(hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, needs, chunk_size):
    """Returns (loss_sum, n_valid, grad_hidden, grad_weight, grad_bias); grads None where not needed."""
    need_h, need_w, need_b = needs
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    need_any = need_h or need_w or need_b
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    chunk = max(1, chunk_size or _chunk_rows(n_rows, vocab, hidden.element_size()))
    buf = torch.empty((min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device)  # reused
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]  # (C, d)
        logits = buf[: end - start]  # (C, V)
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        loss_rows[start:end] = cross_entropy_launch(
            logits, targets[start:end], logits if need_any else None,
            ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
        )
        # logits now holds dloss/dlogits for these rows
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])
        if need_w:
            grad_w.addmm_(logits.t(), h)
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    n_valid = targets.ne(ignore_index).sum()
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return loss_rows.sum(), n_valid, grad_h, grad_w, grad_b


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, needs, chunk_size):
        loss, n_valid, gh, gw, gb = flce_forward(
            hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, needs, chunk_size
        )
        ctx.grads = (gh, gw, gb)
        ctx.mark_non_differentiable(n_valid)
        return loss, n_valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_count):
        g = grad_loss.float()
        # Out of place: a second backward (retain_graph) must see the unscaled gradients again.
        gh, gw, gb = ((None if t is None else (t * g).to(t.dtype)) for t in ctx.grads)
        return gh, gw, None, gb, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses fp32, count of targets != ignore_index int64) of `hidden @ weight.T (+ bias)`.

    hidden (N, d), weight (V, d), targets (N,) already shifted; `chunk_size` overrides the tokens per chunk.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden (N, d) and weight (V, d), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias need one dtype, got {hidden.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return FusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), bias, int(ignore_index),
        float(label_smoothing), None if softcap is None else float(softcap), needs, chunk_size,
    )
