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

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launcher, cast_out


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
    BLOCK_D: tl.constexpr, DUPLICATED: tl.constexpr,
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
    s1 = tl.load(SIN + cs, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    if DUPLICATED:  # HF's rotary embeddings: cos/sin = cat(f, f): the second halves equal the first
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(COS + cs + half, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(SIN + cs + half, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:  # transpose of [[c1, -s1], [s2, c2]]: swap the sines and negate them
        neg_s2 = -s2
        s2 = -s1
        s1 = neg_s2
    _rotate(Q, QO, b, t, sq_b, sq_h, sq_t, n_qh, half, c1, c2, s1, s2, BLOCK_QH, BLOCK_D, tok_mask)
    _rotate(K, KO, b, t, sk_b, sk_h, sk_t, n_kh, half, c1, c2, s1, s2, BLOCK_KH, BLOCK_D, tok_mask)


@functools.lru_cache(maxsize=256)
def _launch_config(n_tokens: int, n_qh: int, n_kh: int, head_dim: int, duplicated: bool) -> tuple[tuple[int], dict]:
    """(grid, block sizes and warps), computed once per shape."""
    block_d = triton.next_power_of_2(head_dim // 2)
    block_qh, block_kh = triton.next_power_of_2(n_qh), triton.next_power_of_2(n_kh)
    per_token = (block_qh + block_kh) * block_d
    # tokens per program: a power of two (arange), ~2K elements per program on a GPU (1 for Llama's 40
    # heads of 128), many under the interpreter whose cost is per program
    cap = 64 if INTERPRETED else 1 << max(0, (2048 // per_token).bit_length() - 1)
    block_t = min(triton.next_power_of_2(n_tokens), cap)
    warps = 4 if block_t * per_token <= 4096 else 8
    consts = dict(BLOCK_T=block_t, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d, DUPLICATED=duplicated,
                  num_warps=warps)
    return (triton.cdiv(n_tokens, block_t),), consts


_launch = Launcher(_rope_kernel)


def _rope_forward(q, k, cos, sin, duplicated: bool) -> tuple:
    """Rotate q and k in place; returns what the backward's launch reuses (cos/sin are inputs, never
    modified: no copies kept)."""
    bsz, n_qh, seq_len, head_dim = q.shape
    n_kh = k.shape[1]
    sc = cos.stride()  # (B|1, T, D): the batch stride is 0 when cos/sin are shared over the batch
    sc_b = sc[0] if cos.shape[0] != 1 else 0
    grid, consts = _launch_config(bsz * seq_len, n_qh, n_kh, head_dim, duplicated)
    args = (cos, sin, bsz * seq_len, seq_len, n_qh, n_kh, head_dim // 2)
    sq, sk = q.stride(), k.stride()
    _launch(grid, q, k, q, k, *args, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sc_b, sc[1], BACKWARD=False, **consts)
    return grid, consts, args, sc_b, sc[1]


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, duplicated):
        ctx.launch = _rope_forward(q, k, cos, sin, duplicated)
        # In place without `mark_dirty`: q and k are usually views of the projections' outputs, which
        # autograd cannot mark dirty in a Function with two outputs. Bumping their version counters
        # instead makes any op that saved the unrotated q or k fail loudly at backward.
        torch.autograd.graph.increment_version((q, k))
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        grid, consts, args, sc_b, sc_t = ctx.launch
        dq, dq_out = _out_like(dq)
        dk, dk_out = _out_like(dk)
        sq, sk = dq.stride(), dk.stride()
        _launch(grid, dq, dk, dq_out, dk_out, *args, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sc_b, sc_t,
                BACKWARD=True, **consts)
        return dq_out, dk_out, None, None, None


def _out_like(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) for the backward with identical strides (empty_like keeps dense layouts)."""
    out = torch.empty_like(g)
    if out.stride() != g.stride() or g.stride(-1) != 1:
        g = g.contiguous()
        out = torch.empty_like(g)
    return g, out


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         duplicated_halves: bool = False):
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) in place by cos/sin (B|1, T, D); returns (q, k).

    Drop-in for HF `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1). In place: q and k must not
    be leaves that require grad, nor tensors something else has saved for its backward.
    `duplicated_halves`: the caller guarantees cos[..., :D/2] == cos[..., D/2:] and the same for sin (HF's
    rotary embeddings build them as cat(freqs, freqs)): only the first halves are read.
    """
    qs, ks, cs = q.shape, k.shape, cos.shape
    if len(qs) != 4 or len(ks) != 4 or len(cs) != 3 or qs[-1] % 2 or ks[-1] != qs[-1] or cs[-1] != qs[-1]:
        raise ValueError(f"rope: q, k (B, H, T, D), cos (B|1, T, D), even D: q {qs}, k {ks}, cos {cs}")
    if ks[0] != qs[0] or ks[2] != qs[2] or cs[1] != qs[2] or cs[0] not in (1, qs[0]) or sin.shape != cs:
        raise ValueError(f"rope: batch/sequence mismatch: q {qs}, k {ks}, cos {cs}, sin {sin.shape}")
    if q.dtype != cos.dtype or k.dtype != q.dtype:
        dtype = torch.promote_types(q.dtype, cos.dtype)  # HF: q * cos promotes
        q, k = q.to(dtype), k.to(dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        _rope_forward(q, k, cos, sin, bool(duplicated_halves))  # no node to record
        torch.autograd.graph.increment_version((q, k))
        return q, k
    return RopeFunction.apply(q, k, cos, sin, bool(duplicated_halves))
