"""Rotary position embedding of q and k in one launch, in place (HF `apply_rotary_pos_emb` numerics).

Forward, per token (b, t), head h, pair i < D/2 (x1 = x[..., i], x2 = x[..., i + D/2]; c, s = cos, sin of
that token, read from both halves exactly as HF's `x * cos + rotate_half(x) * sin` does):
    y1 = x1 * c[i] - x2 * s[i]
    y2 = x2 * c[i + D/2] + x1 * s[i + D/2]
Backward (the transpose; with HF's duplicated halves this is the rotation by -theta):
    dx1 = dy1 * c[i] + dy2 * s[i + D/2]
    dx2 = dy2 * c[i + D/2] - dy1 * s[i]

Shapes: q (B, Hq, T, D) and k (B, Hk, T, D) in HF's layout, any strides with a contiguous last dim (the
`.view(B, T, H, D).transpose(1, 2)` of a projection is rotated where it lies); Hq != Hk for GQA.
cos/sin (B or 1, T, D): the HF rotary embedding's output, so every rope variant (Llama-3.1 scaling,
YaRN, dynamic, ...) and per-token positions (packed sequences restarting at 0) come for free.
Dtypes: fp32 arithmetic, stored in q's dtype (q is first promoted with cos's dtype, as HF's product
would). Kept for backward: cos and sin only (ctx attributes, with the launch parameters). The backward
writes new gradient tensors.
In place: the forward overwrites q and k and returns them (aliases carrying this op's grad_fn); their
version counters are bumped, so a tensor saved elsewhere before the rotation fails loudly, never silently.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, cast_out


@triton.jit
def _rotate(X, XO, b, t, stride_b, stride_h, stride_t, n_heads, half, c1, c2, s1, s2,
            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, tok_mask):
    """Rotate all heads of BLOCK_T tokens: blocks (BLOCK_T, BLOCK_H, BLOCK_D)."""
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = tok_mask[:, None, None] & (h < n_heads) & (d < half)
    offs = b[:, None, None] * stride_b + t[:, None, None] * stride_t + h * stride_h + d
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(XO + offs, cast_out(x1 * c1 - x2 * s1, XO.dtype.element_ty), mask=mask)
    tl.store(XO + offs + half, cast_out(x2 * c2 + x1 * s2, XO.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, n_tokens, seq_len, n_qh, n_kh, half,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sc_b, sc_t,
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # BLOCK_T tokens per program (1 on a GPU for Llama-sized heads), all q heads and all k heads.
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    b = tok // seq_len
    t = tok % seq_len
    d = tl.arange(0, BLOCK_D)
    cmask = tok_mask[:, None] & (d < half)[None, :]
    cs = b[:, None] * sc_b + t[:, None] * sc_t + d[None, :]
    c1 = tl.load(COS + cs, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + cs + half, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + cs, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + cs + half, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:  # transpose of [[c1, -s1], [s2, c2]]: swap the sines and negate them
        neg_s2 = -s2
        s2 = -s1
        s1 = neg_s2
    _rotate(Q, QO, b, t, sq_b, sq_h, sq_t, n_qh, half, c1, c2, s1, s2, BLOCK_QH, BLOCK_D, tok_mask)
    _rotate(K, KO, b, t, sk_b, sk_h, sk_t, n_kh, half, c1, c2, s1, s2, BLOCK_KH, BLOCK_D, tok_mask)


def rope_config(q, k, cos, sin) -> dict:
    """Launch parameters shared by the forward and the backward (computed once, kept in ctx)."""
    bsz, n_qh, seq_len, head_dim = q.shape
    n_kh = k.shape[1]
    half = head_dim // 2
    cos = cos.expand(bsz, seq_len, head_dim)  # (B, T, D); stride 0 over B when shared
    sin = sin.expand(bsz, seq_len, head_dim)
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1, "cos/sin need the same, last-dim-contiguous layout"
    block_d = triton.next_power_of_2(half)
    block_qh, block_kh = triton.next_power_of_2(n_qh), triton.next_power_of_2(n_kh)
    per_token = (block_qh + block_kh) * block_d
    n_tokens = bsz * seq_len
    # tokens per program: a power of two (arange), ~2K elements per program on a GPU (1 for Llama's 40
    # heads of 128), many under the interpreter whose cost is per program
    cap = 64 if INTERPRETED else 1 << max(0, (2048 // per_token).bit_length() - 1)
    block_t = min(triton.next_power_of_2(n_tokens), cap)
    return dict(
        grid=(triton.cdiv(n_tokens, block_t),), cos=cos, sin=sin, args=(n_tokens, seq_len, n_qh, n_kh, half),
        consts=dict(BLOCK_T=block_t, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d,
                    num_warps=4 if block_t * per_token <= 4096 else 8),
    )


def rope_launch(cfg: dict, q, k, q_out, k_out, backward: bool) -> None:
    """Rotate q, k (B, H, T, D) into q_out, k_out (same strides as q, k; may be q, k themselves)."""
    cos = cfg["cos"]
    _rope_kernel[cfg["grid"]](
        q, k, q_out, k_out, cos, cfg["sin"], *cfg["args"],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), cos.stride(0), cos.stride(1),
        BACKWARD=backward, **cfg["consts"],
    )


def _out_like(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) for the backward with identical strides (empty_like keeps dense layouts)."""
    out = torch.empty_like(g)
    if out.stride() != g.stride() or g.stride(-1) != 1:
        g = g.contiguous()
        out = torch.empty_like(g)
    return g, out


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.cfg = rope_config(q, k, cos, sin)
        rope_launch(ctx.cfg, q, k, q, k, backward=False)
        # In place without `mark_dirty`: q and k are usually views of the projections' outputs, which
        # autograd cannot mark dirty in a Function with two outputs. Bumping their version counters
        # instead makes any op that saved the unrotated q or k fail loudly at backward.
        torch.autograd.graph.increment_version((q, k))
        return q, k  # cos/sin are kept (expanded) in ctx.cfg: inputs, never modified

    @staticmethod
    def backward(ctx, dq, dk):
        dq, dq_out = _out_like(dq)
        dk, dk_out = _out_like(dk)
        rope_launch(ctx.cfg, dq, dk, dq_out, dk_out, backward=True)
        return dq_out, dk_out, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) in place by cos/sin (B|1, T, D); returns (q, k).

    Drop-in for HF `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1). In place: q and k must not
    be leaves that require grad, nor tensors something else has saved for its backward.
    """
    if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1] or cos.shape[-1] != q.shape[-1]:
        raise ValueError(f"rope: head dims must match and be even: q {q.shape}, k {k.shape}, cos {cos.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or cos.shape[-2] != q.shape[2]:
        raise ValueError(f"rope: batch/sequence mismatch: q {q.shape}, k {k.shape}, cos {cos.shape}")
    dtype = torch.promote_types(q.dtype, cos.dtype)  # HF: q * cos promotes
    q = q.to(dtype) if q.stride(-1) == 1 else q.to(dtype).contiguous()
    k = k.to(dtype) if k.stride(-1) == 1 else k.to(dtype).contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return RopeFunction.apply(q, k, cos, sin)
