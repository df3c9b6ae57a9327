"""Fused LoRA projections: the frozen base matmul and the rank-r update of one or several projections that
read the same input (q/k/v, gate/up), in the compute dtype, with one autograd node for the group.

For projections i = 1..n of one input x (N, d_in) in the compute dtype, frozen W_i (d_out_i, d_in) and
optional frozen bias b_i, trainable fp32 A_i (r_i, d_in), B_i (d_out_i, r_i), scaling s_i:

Forward:
    A    = cat_i A_i                       (R, d_in), R = sum r_i, in the compute dtype (B_i too): one
                                           cast-and-concatenate launch for the group's adapters (cast.py)
    mid  = [s_i x @ A_i^T]                 (N, R)        one GEMM for the whole group (one read of x), each
                                                         s_i applied to the fp32 accumulator (alpha, beta=0)
    y_i  = x @ W_i^T + b_i                 (N, d_out_i)  the base GEMM
    y_i += mid_i @ B_i^T                   in place: a K=r_i GEMM with beta=1, no (N, d_out) temporary
  or, where W_i is dequantized on demand (4-bit) and the group's outputs are wider than x (q/k/v, gate/up):
    y_i  = [x | mid] @ [W_i | B_pad_i]^T   one GEMM with K = d_in + R: W_i dequantized into the first d_in
                                           columns, B_i in its own r_i of the last R (zeros elsewhere; a
                                           callable with `writes_tail` writes them in W's launch), so
                                           the K=r_i GEMM's read and write of every output are gone for one
                                           copy of x (measured on an H100:
                                           launch/results/kernel_costs_h100.md)
Backward (g_i = dL/dy_i, N x d_out_i); mid and gmid carry the scalings, so no gradient needs its own:
    gmid_i = s_i g_i @ B_i                 (N, r_i)        s_i in the GEMM's epilogue, into gmid's columns
    dB_i   = g_i^T @ mid_i                 (d_out_i, r_i)  fp32 output
    dA     = gmid^T @ x                    (R, d_in)       fp32 output, split per projection
    dx     = gmid @ A + sum_i g_i @ W_i    (N, d_in)       each base GEMM accumulates in place (beta=1)

Where x comes from rms_norm(..., spare_cols >= R) (distsft's norms before q/k/v and gate/up), each of its
rows is followed by R columns of its own storage: mid is written there and [x | mid] is a view of x's
storage, with no copy of x (the spare-columns protocol of _common.py, `SPARE_COLUMNS`; the columns
are handed to the first call only).

Saved for backward: x (which the caller's graph holds anyway), mid (N x R) and the tiny casted A and B.
What this replaces (peft 0.21 `lora.Linear.forward` with fp32 adapters): per projection an fp32 copy of x
(saved for backward), the update computed and added in fp32, and a cast back: three to five extra passes
over (N, d_out) and an (N, d_in) fp32 tensor kept alive until backward, times seven projections per layer.

Numerics: mid = s x A^T is rounded once to the compute dtype from its fp32 accumulator, A and B are
bf16-rounded, the update is accumulated in fp32 and added to the rounded base output (one rounding each);
in the [x | mid] path base and update share one fp32 accumulator and one rounding. peft keeps x A^T in
fp32 (for fp32 adapters) and rounds only the sum, so its A and B gradients are somewhat more accurate:
tests/kernels/test_lora.py bounds ours against peft's with bf16 adapters (the same GEMM precision) by
the kernel rule and against peft's fp32-adapter arithmetic within 3x of its error. In fp32 both are exact
to rounding. `lora_projections_ref` is peft's arithmetic, the tests' reference.
"""

from __future__ import annotations

import torch

_OUT_DTYPE_MM: bool | None = None  # does torch.mm(..., out_dtype=) work for CUDA bf16/fp16 here?


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: straight from the GEMM's fp32 accumulator where the build allows it."""
    global _OUT_DTYPE_MM
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _OUT_DTYPE_MM is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_MM = True
            return out
        except (TypeError, RuntimeError):
            _OUT_DTYPE_MM = False
    return torch.mm(a, b).float()


try:  # one launch for a group's adapter casts where Triton runs (cast.py); torch ops elsewhere
    from ._common import spare_columns
    from ._common import triton_can_run as _triton_can_run
    from .cast import MAX_TENSORS as _MAX_CAST
    from .cast import cast_concat as _cast_concat
except ImportError:  # no Triton on this platform: no rms_norm kernel either, so no input has spare columns
    _cast_concat = None

    def spare_columns(x: torch.Tensor, width: int, claim: bool = False) -> None:
        return None


def _adapters(lora_a, lora_b, dt: torch.dtype, with_b: bool):
    """(A = cat_i A_i (R, d_in), [B_i] or None) in the compute dtype: one cast-and-concatenate launch where
    Triton runs and a cast is needed, else torch's cat and casts."""
    ts = [*lora_a, *lora_b] if with_b else list(lora_a)
    if (_cast_concat is not None and len(ts) <= _MAX_CAST and any(t.dtype != dt for t in ts)
            and _triton_can_run(ts[0]) and all(t.is_contiguous() for t in ts)):
        flat = _cast_concat(ts, dt)  # row-major tensors end to end: A_1..A_n are cat_i A_i
        off = sum(a.numel() for a in lora_a)
        a_cat, b_c = flat[:off].view(-1, lora_a[0].shape[1]), []
        for b in lora_b if with_b else ():
            b_c.append(flat[off:off + b.numel()].view(b.shape))
            off += b.numel()
        return a_cat, (b_c if with_b else None)
    return _cat(lora_a).to(dt), ([b.to(dt) for b in lora_b] if with_b else None)


def _cat(ts) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """s * (a @ b) in a's dtype, s applied to the fp32 accumulator (one rounding, no separate scaling
    kernel), into `out` (any (n, m) view with unit last stride) when given."""
    if out is None:
        if s == 1.0:
            return torch.mm(a, b)
        out = a.new_empty(a.shape[0], b.shape[1])
    return out.addmm_(a, b, beta=0, alpha=s)  # beta=0: out's values are never read


def _scaled_products(a: torch.Tensor, b: torch.Tensor, scalings, ranks, out: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """[s_1 a @ b_1 | ... | s_n a @ b_n] (N, R) for a (N, K) and b = [b_1 | ... | b_n] (K, R): one GEMM
    where the scalings agree (the usual case: one adapter, one rank), else one per projection into its
    columns; into `out` (an (N, R) view with unit last stride) when given."""
    if len(set(scalings)) == 1:
        return _scaled_mm(a, b, scalings[0], out=out)
    out, off = a.new_empty(a.shape[0], b.shape[1]) if out is None else out, 0
    for v, r in zip(scalings, ranks, strict=True):
        _scaled_mm(a, b[:, off:off + r], v, out=out[:, off:off + r])
        off += r
    return out


def _forward(x, scalings, values_unused, keep_dequantized, weights, biases, lora_a, lora_b,
             for_backward: bool = True):
    """The outputs (..., d_out_i) and what the backward reads: (outs, mid, a_cat, b_c, kept weights), where
    mid = [s_i x A_i^T] (N, R) carries the scalings (applied in its GEMM's fp32 epilogue), so that neither
    the update nor any gradient needs a scaling of its own. b_c (the B_i cast to the compute dtype) only
    where `for_backward`."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    concat_k = _concat_k(weights, [b.shape[0] for b in lora_b], x2.shape[1], values_unused)
    # B in the compute dtype: read by the per-projection GEMMs, and by the backward (the [x | mid] path
    # takes B's fp32 values into its [W | B_pad] buffer directly)
    a_cat, b_c = _adapters(lora_a, lora_b, dt, with_b=for_backward or not concat_k)  # (R, d_in), [B_i]
    ranks = [a.shape[0] for a in lora_a]
    # [x | mid] on x's own storage where x came with spare columns (rms_norm's spare_cols): no copy of x
    x_ext = spare_columns(x, sum(ranks), claim=True) if concat_k else None
    mid = _scaled_products(x2, a_cat.t(), scalings, ranks,
                           out=None if x_ext is None else x_ext[:, x2.shape[1]:])  # (N, R)
    if concat_k:
        outs, kept = _forward_concat_k(x2, mid, weights, biases, lora_b, keep_dequantized, x_ext)
    else:
        outs, kept = _forward_each(x2, mid, weights, biases, b_c, values_unused, keep_dequantized)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs], mid, a_cat, b_c or [], kept


class _LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scalings, values_unused, keep_dequantized, *tensors):
        n = len(scalings)  # tensors: W_1..W_n (tensors or callables), b_1..b_n, A_1..A_n, B_1..B_n
        weights, biases, lora_a, lora_b = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        outs, mid, a_cat, b_c, kept = _forward(x, scalings, values_unused, keep_dequantized, weights, biases,
                                               lora_a, lora_b)
        ctx.scalings = scalings
        ctx.ranks = [a.shape[0] for a in lora_a]
        ctx.adapter_dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_a, lora_b, strict=True)]
        weights = [kept.get(i, w) for i, w in enumerate(weights)]
        ctx.weight_fns = [w if callable(w) else None for w in weights]
        ctx.save_for_backward(x, mid, a_cat, *b_c, *(w for w in weights if torch.is_tensor(w)))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.scalings)
        x, mid, a_cat, *rest = ctx.saved_tensors
        b_c, weights = rest[:n], iter(rest[n:])
        x2 = x.reshape(-1, x.shape[-1])
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]  # (N, d_out_i)
        # gmid = [s_i g_i @ B_i] (N, R), scaled in the GEMMs' epilogues like mid; then no gradient needs a
        # scaling of its own: dB_i = g_i^T @ mid_i, dA = gmid^T @ x, dx += gmid @ A
        gmid = _scaled_products_each(g2, b_c, ctx.scalings, ctx.ranks)
        grad_b, off = [], 0
        for i, r in enumerate(ctx.ranks):
            grad_b.append(_mm_f32(g2[i].t(), mid[:, off:off + r]))  # (d_out_i, r_i)
            off += r
        grad_a_cat = _mm_f32(gmid.t(), x2)  # (R, d_in)
        grad_a = list(grad_a_cat.split(ctx.ranks)) if n > 1 else [grad_a_cat]
        grad_a = [_as(g, dt_a) for g, (dt_a, _) in zip(grad_a, ctx.adapter_dtypes, strict=True)]
        grad_b = [_as(g, dt_b) for g, (_, dt_b) in zip(grad_b, ctx.adapter_dtypes, strict=True)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            for i in range(n):
                w = ctx.weight_fns[i]() if ctx.weight_fns[i] is not None else next(weights)
                # += g_i @ W_i, in the GEMM's epilogue
                grad_x = torch.mm(g2[i], w) if grad_x is None else grad_x.addmm_(g2[i], w)
            grad_x = grad_x.addmm_(gmid, a_cat).view_as(x)  # + gmid @ A
        return (grad_x, None, None, None, *([None] * n), *([None] * n), *grad_a, *grad_b)


def _scaled_products_each(gs, bs, scalings, ranks) -> torch.Tensor:
    """[s_1 g_1 @ b_1 | ... | s_n g_n @ b_n] (N, R): each projection's GEMM writes its own columns."""
    if len(gs) == 1:
        return _scaled_mm(gs[0], bs[0], scalings[0])
    out, off = gs[0].new_empty(gs[0].shape[0], sum(ranks)), 0
    for g, b, v, r in zip(gs, bs, scalings, ranks, strict=True):
        _scaled_mm(g, b, v, out=out[:, off:off + r])
        off += r
    return out


def _base(x2, w, bias):
    """x @ w^T (+ bias). The GEMMs F.linear would run on 2-D operands, called directly: DeepSpeed ZeRO-3
    replaces `torch.nn.functional.linear` process-wide with an autograd Function of its own (a Python
    layer per call, ~450 per step here, for no change)."""
    return torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())


def _forward_each(x2, mid, weights, biases, b_c, values_unused: bool, keep_dequantized: bool):
    """y_i = x @ W_i^T + b_i, then += mid_i @ B_i^T in place (a K=r_i GEMM with beta=1), per projection,
    B_i in the compute dtype (b_c). Returns (outputs (N, d_out_i), the kept dequantized weights)."""
    outs, kept, off = [], {}, 0
    for i, b in enumerate(b_c):
        r = b.shape[1]
        mid_i = mid[:, off:off + r]
        off += r
        if values_unused:  # recompute: only what backward reads
            y = x2.new_empty(x2.shape[0], b.shape[0])
        else:
            w = weights[i]() if callable(weights[i]) else weights[i]  # a 4-bit weight: dequantized now
            y = _base(x2, w, biases[i])  # (N, d_out_i)
            if keep_dequantized and callable(weights[i]):
                kept[i] = w
            del w
            y.addmm_(mid_i, b.t())
        outs.append(y)
    return outs, kept


def _concat_k(weights, d_outs, d_in: int, values_unused: bool) -> bool:
    """Whether to run each projection as one GEMM over [x | mid] and [W_i | B_pad_i] (module docstring):
    weights dequantized on demand (they are written into a fresh buffer anyway, so the B columns cost
    nothing), and the group's outputs wider than its input (the K=r GEMM's pass over every output is what
    this removes; building [x | mid] costs one pass over x)."""
    return not values_unused and all(callable(w) for w in weights) and sum(d_outs) > d_in


def _forward_concat_k(x2, mid, weights, biases, lora_b, keep_dequantized: bool, x_ext: torch.Tensor | None = None):
    """y_i = [x | mid] @ [W_i | B_pad_i]^T (+ b_i) for every projection of the group, where B_pad_i is B_i
    in its own r_i columns of R and zeros in the others: the base and the update in one GEMM, one rounding.
    A callable with `writes_tail` fills the B columns in the same launch as W (`fn(out=, tail=(B_i, col,
    R))`); for any other, they are written here. `x_ext`: [x | mid] already in place (x's spare columns).
    Returns (outputs, the kept dequantized weights)."""
    d_in = x2.shape[1]
    if x_ext is None:  # else x's rows with mid already written after them
        x_ext = torch.cat([x2, mid], dim=1)  # (N, d_in + R)
    width = mid.shape[1]
    outs, kept, col = [], {}, 0
    for i, b in enumerate(lora_b):
        d_out, r = b.shape
        w_ext = x2.new_empty(d_out, d_in + width)
        fn = weights[i]
        if getattr(fn, "writes_tail", False):  # W dequantized into its columns, B into its own of the last R
            w = fn(out=w_ext[:, :d_in], tail=(b, col, width))
        else:
            w = fn(out=w_ext[:, :d_in])
            tail = w_ext[:, d_in:]
            tail.zero_()
            tail[:, col:col + r].copy_(b)
        outs.append(_base(x_ext, w_ext, biases[i]))
        if keep_dequantized:
            kept[i] = w
        col += r
    return outs, kept


def lora_projections(x, lora_a, lora_b, scalings, *, weights, biases=None, values_unused: bool = False,
                     keep_dequantized: bool = False):
    """y_i = x @ W_i^T + b_i + s_i (x @ A_i^T) @ B_i^T for each i, as one autograd node.

    x (..., d_in); lora_a[i] (r_i, d_in), lora_b[i] (d_out_i, r_i) trainable (any float dtype, fp32 for
    peft); weights[i] (d_out_i, d_in) and biases[i] frozen. weights[i] may also be a callable returning the
    (d_out_i, d_in) weight (a 4-bit weight dequantized on demand: called in the forward and again in the
    backward, never kept), as `fn()` or as `fn(out=buffer)` to write it into a given (d_out_i, d_in) view
    with contiguous rows. Returns a tuple of (..., d_out_i).

    `values_unused`: the caller promises nothing will read the outputs' values, only backpropagate through
    them (a checkpointed layer's recompute, where the last projection feeds only the residual sum that
    leaves the layer): the GEMMs producing them are skipped and the outputs are uninitialised memory.
    The backward is unchanged (it reads x, mid and the weights, never the outputs).

    `keep_dequantized`: weights given as callables are called once, in the forward, and the result is
    kept for the backward (memory for time: a checkpointed layer's recompute runs right before its
    backward, so its dequantized weights live only that long).
    """
    n = len(lora_a)
    weights = list(weights)
    biases = list(biases) if biases is not None else [None] * n
    if len(weights) != n or any(w is None for w in weights):
        raise ValueError(f"lora_projections: give one base weight (a tensor or a callable) per projection ({n})")
    for i in range(n):
        for name, t in (("weight", weights[i]), ("bias", biases[i])):
            if torch.is_tensor(t) and t.requires_grad:
                raise ValueError(f"projection {i}: the base {name} must be frozen (requires_grad=False)")
    scalings = tuple(float(s) for s in scalings)
    if not torch.is_grad_enabled():  # nothing to record (a checkpointed layer's first forward): no node
        return tuple(_forward(x, scalings, values_unused, False, weights, biases, lora_a, lora_b,
                              for_backward=False)[0])
    return _LoRAProjections.apply(x, scalings, bool(values_unused), bool(keep_dequantized), *weights, *biases,
                                  *lora_a, *lora_b)


def lora_projections_ref(x, lora_a, lora_b, scalings, *, weights, biases=None):
    """peft 0.21's arithmetic: base output in the input dtype, x cast to the adapter dtype, the update
    computed and added there, the sum cast back."""
    outs = []
    for i in range(len(lora_a)):
        y = torch.nn.functional.linear(x, weights[i], None if biases is None else biases[i])
        xa = x.to(lora_a[i].dtype)
        outs.append((y + (xa @ lora_a[i].t()) @ lora_b[i].t() * scalings[i]).to(y.dtype))
    return tuple(outs)
