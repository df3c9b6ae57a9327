"""Cross-entropy over a large vocabulary (<= 256K), summed, with its gradient computed in the forward.

Per row n with target y (rows with y == ignore_index contribute 0 loss and 0 gradient), in fp32:
    z_j   = logits_j                      or  softcap * tanh(logits_j / softcap)
    lse   = log sum_j exp(z_j)            (online over vocab blocks: running max m, running sum s)
    loss  = lse - (1 - eps) z_y - eps * mean_j z_j              (eps = label_smoothing; torch's definition)
    dz_j  = softmax_j - (1 - eps) [j == y] - eps / V
    dlogit_j = dz_j * (1 - (z_j / softcap)^2)                   (only with soft-capping)
Outputs (loss_sum fp32 scalar, n_valid int64 scalar): the sum, not the mean, so that the trainer divides
by the global token count. Two passes over each row: an online log-sum-exp, then the gradient.

Shapes: logits (N, V), any strides with a contiguous last dim; targets (N,) int. The gradient has the
logits' dtype and is written in place into the logits buffer when `inplace=True` (the caller owns the
logits and will not read them again: the fused linear CE and `distsft.patching`'s loss), else into a new
buffer. Saved for backward: that gradient only; backward scales it by grad_output in place (one more
pass over (N, V), skipped on the device when grad_output is 1).
Targets must lie in [0, V) or equal ignore_index (not checked on the device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launcher, cast_out


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)  # softcap * tanh(x / softcap)
    return x


@triton.jit
def _ce_kernel(
    LOGITS, GRAD, TARGETS, LOSS, n_cols, stride_l, stride_g, ignore_index, label_smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_l
    grad = GRAD + row * stride_g
    target = tl.load(TARGETS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                tl.store(grad + start + cols, tl.zeros((BLOCK_V,), GRAD.dtype.element_ty), mask=start + cols < n_cols)
        return

    # Pass 1: online log-sum-exp (running max m and sum s, rescaled when the max grows; one exp per
    # logit), and the sum of z for label smoothing.
    m = -1e30  # finite: no inf - inf before the first block
    s = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        mask = start + cols < n_cols
        z = _capped(tl.load(logits + start + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_y = _capped(tl.load(logits + target).to(tl.float32), softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - label_smoothing) * z_y - label_smoothing * (z_sum / n_cols)
    tl.store(LOSS + row, loss)

    # Pass 2: dz = softmax - (1 - eps) onehot - eps / V, times the tanh derivative with soft-capping.
    if COMPUTE_GRAD:
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            z = _capped(tl.load(logits + start + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            dz = tl.exp(z - lse) - label_smoothing / n_cols
            dz = tl.where(start + cols == target, dz - (1.0 - label_smoothing), dz)
            if HAS_SOFTCAP:
                t = z / softcap
                dz = dz * (1.0 - t * t)
            tl.store(grad + start + cols, cast_out(dz, GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(X, SCALE, n_cols, stride, BLOCK_V: tl.constexpr):
    """X[row] *= SCALE, in place; nothing read or written when SCALE == 1 (decided on the device: no sync)."""
    scale = tl.load(SCALE).to(tl.float32)
    if scale != 1.0:
        x_row = X + tl.program_id(0).to(tl.int64) * stride
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_row + start + cols, cast_out(x * scale, X.dtype.element_ty), mask=mask)


_launch_scale, _launch_ce = Launcher(_scale_kernel), Launcher(_ce_kernel)


def scale_rows_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, V) *= scale (a 0-dim tensor on x's device), in place; free when scale is 1."""
    if x.shape[0] and x.shape[1]:
        block_v = min(triton.next_power_of_2(x.shape[1]), 65536 if INTERPRETED else 4096)
        _launch_scale((x.shape[0],), x, scale.reshape(1), x.shape[1], x.stride(0), BLOCK_V=block_v, num_warps=8)
    return x


def cross_entropy_launch(logits, targets, grad, *, ignore_index, label_smoothing, softcap) -> torch.Tensor:
    """Per-row losses (N,) fp32; the gradient of the summed loss goes into `grad` (None: no gradient)."""
    n_rows, n_cols = logits.shape
    assert logits.stride(-1) == 1 and (grad is None or grad.stride(-1) == 1)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    block_v = min(triton.next_power_of_2(n_cols), 65536 if INTERPRETED else 4096)
    _launch_ce(
        (n_rows,), logits, logits if grad is None else grad, targets, loss, n_cols, logits.stride(0),
        logits.stride(0) if grad is None else grad.stride(0), ignore_index, label_smoothing,
        1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None, BLOCK_V=block_v, num_warps=8,
    )
    return loss


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing, softcap, inplace):
        grad = None
        if logits.requires_grad:
            grad = logits if inplace else torch.empty_like(logits)
            if inplace:  # anything that saved these logits now fails at backward instead of reading grads
                torch.autograd.graph.increment_version(logits)
        loss = cross_entropy_launch(
            logits, targets, grad, ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap
        )
        n_valid = targets.ne(ignore_index).sum()
        ctx.grad = grad  # not save_for_backward: with inplace it aliases the (clobbered) input
        ctx.mark_non_differentiable(n_valid)
        return loss.sum(), n_valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_count):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("cross_entropy: backward ran twice (retain_graph); its gradient buffer is consumed")
        return scale_rows_(grad, grad_loss.float()), None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses fp32, count of targets != ignore_index int64) for logits (N, V), targets (N,).

    `inplace=True` overwrites `logits` with the gradient during the forward (saves an (N, V) buffer);
    only for logits that nothing else reads afterwards.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits (N, V) and targets (N,), got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return CrossEntropyFunction.apply(
        logits, targets.contiguous(), int(ignore_index), float(label_smoothing), softcap, bool(inplace)
    )
