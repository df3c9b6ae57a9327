"""RMSNorm, Llama and Gemma flavours, fused forward and backward.

Forward, per row x of length d (all arithmetic in fp32):
    rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd
    casting="llama":  y = (offset + w) * xhat.to(x.dtype)      (HF LlamaRMSNorm; offset is 0)
    casting="gemma":  y = ((offset + w) * xhat).to(x.dtype)    (HF GemmaRMSNorm; offset is 1: y = xhat * (1 + w))
Backward, with g = dy * (offset + w):
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat'   (xhat' = xhat.to(x.dtype) for llama, xhat for gemma)
The casts are treated as the identity in the backward, as autograd does.

Shapes: x (..., d) with a contiguous last dim, w (d,). Output dtype: llama: promote(x, w) (as HF's
`weight * hidden.to(input_dtype)`), gemma: x.dtype. Saved for backward: x, w and rstd (fp32, one per
row); xhat is recomputed. dw is computed only when w requires grad (a frozen norm under LoRA costs
nothing extra): a persistent grid (~16 warps per SM) accumulates it in fp32 registers over its rows, and
torch sums the per-program partials. The launch sizes are computed once per shape.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common
from ._common import Launcher, cast_out, num_programs, row_block, with_spare_cols


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps, offset,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    xhat = x * rstd[:, None]
    w = offset + tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if not GEMMA:  # llama: round the normalised row to the input dtype before the weight
        xhat = cast_out(xhat, X.dtype.element_ty).to(tl.float32)
    y = xhat * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], cast_out(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW, n_rows, n_cols, blocks_per_program, stride_dy, stride_x, stride_dx, offset,
    GEMMA: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program p owns the rows of row blocks [p * blocks_per_program, (p + 1) * blocks_per_program) and keeps
    # its share of dw in registers. The next block's dy, x and rstd are loaded before the current block is
    # reduced (software pipelining by hand), so each program keeps one block of loads in flight.
    row_start = tl.program_id(0).to(tl.int64) * blocks_per_program * BLOCK_M
    row_end = tl.minimum(row_start + blocks_per_program * BLOCK_M, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = offset + tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rows = row_start + tl.arange(0, BLOCK_M)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    dy_next = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    x_next = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    rstd_next = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)
    for start in range(row_start, row_end, BLOCK_M):
        dy = dy_next.to(tl.float32)
        x = x_next.to(tl.float32)
        rstd = rstd_next
        nxt = start + BLOCK_M + tl.arange(0, BLOCK_M)
        nmask = (nxt < row_end)[:, None] & col_mask[None, :]
        dy_next = tl.load(DY + nxt[:, None] * stride_dy + cols[None, :], mask=nmask, other=0.0)
        x_next = tl.load(X + nxt[:, None] * stride_x + cols[None, :], mask=nmask, other=0.0)
        rstd_next = tl.load(RSTD + nxt, mask=nxt < row_end, other=0.0)
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], cast_out(dx, DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            if not GEMMA:
                xhat = cast_out(xhat, X.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(DW + tl.program_id(0).to(tl.int64) * n_cols + cols, dw, mask=col_mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])  # (rows, d)
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=256)
def _fwd_config(n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """(grid, BLOCK_N, BLOCK_M, num_warps) of the forward: one block of rows per program."""
    block_n, block_m, warps = row_block(n_cols)
    return triton.cdiv(n_rows, block_m), block_n, block_m, warps


@functools.lru_cache(maxsize=256)
def _bwd_config(n_rows: int, n_cols: int, need_dw: bool, n_sms: int) -> tuple[int, int, int, int, int]:
    """(grid, blocks_per_program, BLOCK_N, BLOCK_M, num_warps) of the backward.

    Row blocks of ~8K elements (2 rows of 4096), 16 warps for blocks that large. Without dw: one row block
    per program, the hardware keeping many programs per SM in flight. With dw: a persistent grid of ~16
    warps per SM (one program of 16 warps), each program walking its contiguous share of the row blocks
    with the next block's loads in flight, so the (programs, d) fp32 partials stay small (~2 MB). What
    each choice measured: launch/results/kernel_costs_h100.md.
    """
    block_n, block_m, warps = row_block(n_cols, max_elems=8192)
    if block_n * block_m >= 8192:
        warps = 16
    n_blocks = triton.cdiv(n_rows, block_m)
    grid = min(n_blocks, max(1, 16 // warps) * n_sms) if need_dw else n_blocks
    per_program = triton.cdiv(n_blocks, grid)
    return triton.cdiv(n_blocks, per_program), per_program, block_n, block_m, warps


_launch_fwd, _launch_bwd = Launcher(_rms_norm_fwd_kernel), Launcher(_rms_norm_bwd_kernel)


def rms_norm_forward(x, weight, eps: float, offset: float, gemma: bool, spare_cols: int = 0):
    """Launch the forward. Returns (y with x's shape, x as (rows, d), rstd (rows,) fp32)."""
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if gemma or weight.dtype == x.dtype else torch.promote_types(x.dtype, weight.dtype)
    if spare_cols:
        y = with_spare_cols(x.shape, spare_cols, out_dtype, x.device)
    else:
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)  # not a view: callers may rotate it in place
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    grid, block_n, block_m, warps = _fwd_config(n_rows, n_cols)
    _launch_fwd(
        (grid,), x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), n_cols + spare_cols, eps, offset,
        GEMMA=gemma, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, x2, rstd


def rms_norm_backward(dy, x2, weight, rstd, offset: float, gemma: bool, need_dw: bool):
    """Launch the backward. Returns (dx (rows, d) in x's dtype, dw or None)."""
    dy2 = _as_rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    grid, per_program, block_n, block_m, warps = _bwd_config(n_rows, n_cols, need_dw, num_programs(x2.device))
    dw_partial = torch.empty((grid, n_cols), dtype=torch.float32, device=x2.device) if need_dw else dx
    _launch_bwd(
        (grid,), dy2, x2, weight, rstd, dx, dw_partial, n_rows, n_cols, per_program, dy2.stride(0), x2.stride(0),
        n_cols, offset, GEMMA=gemma, HAS_DW=need_dw, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    if not need_dw:
        return dx, None
    dw = dw_partial.sum(0)  # fp32 across programs
    return dx, dw if dw.dtype == weight.dtype else dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma, spare_cols=0):
        y, x2, rstd = rms_norm_forward(x, weight, eps, offset, gemma, spare_cols)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.gemma, ctx.x_shape = offset, gemma, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.offset, ctx.gemma, need_dw)
        return dx.view(ctx.x_shape), dw, None, None, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0, casting: str = "llama",
    spare_cols: int = 0,
) -> torch.Tensor:
    """RMSNorm over the last dim. Llama: `rms_norm(x, w, eps)`; Gemma: `offset=1.0, casting="gemma"`.

    `spare_cols` > 0 (and `_common.SPARE_COLUMNS` on): each output row is followed by that many columns of
    the output's storage that no element covers (the output is row-strided, not a view): `spare_columns(y,
    width)` hands them to the next op, the fused LoRA projections (lora.py), which write their
    rank-R input projection there instead of copying y into a wider [y | mid] buffer."""
    if casting not in ("llama", "gemma"):
        raise ValueError(f"casting must be 'llama' or 'gemma', got {casting!r}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    spare_cols = int(spare_cols)
    if spare_cols < 0:
        raise ValueError(f"spare_cols must be >= 0, got {spare_cols}")
    if not _common.SPARE_COLUMNS:
        spare_cols = 0
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):  # no node to record
        return rms_norm_forward(x, weight, float(eps), float(offset), casting == "gemma", spare_cols)[0]
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting == "gemma", spare_cols)
