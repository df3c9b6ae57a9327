"""Fused LoRA projections: the frozen base matmul and the rank-r update of one or several projections that
read the same input (q/k/v, gate/up), in the compute dtype, with one autograd node for the group.

For projections i = 1..n of one input x (N, d_in) in the compute dtype, frozen W_i (d_out_i, d_in) and
optional frozen bias b_i, trainable fp32 A_i (r_i, d_in), B_i (d_out_i, r_i), scaling s_i:

Forward:
    A    = cat_i A_i                       (R, d_in), R = sum r_i, cast to the compute dtype
    mid  = x @ A^T                         (N, R)        one GEMM for the whole group (one read of x)
    y_i  = x @ W_i^T + b_i                 (N, d_out_i)  the base GEMM
    y_i += s_i mid_i @ B_i^T               in place: a K=r_i GEMM with beta=1, alpha=s_i, no (N, d_out) temporary
  or, where W_i is dequantized on demand (4-bit) and the group's outputs are wider than x (q/k/v, gate/up):
    y_i  = [x | s mid] @ [W_i | B_pad_i]^T one GEMM with K = d_in + R: W_i dequantized into the first d_in
                                           columns, B_i in its own r_i of the last R (zeros elsewhere), so
                                           the K=r_i GEMM's read and write of every output are gone for one
                                           copy of x (an 8B gate/up projection at 4,096 tokens on an H100:
                                           608 + 128 us as two GEMMs, 627 + 27/2 us this way)
  or, where the base is not a plain weight (a 4-bit bitsandbytes layer computes y0_i itself):
    y_i  = y0_i + s_i mid_i @ B_i^T
  and with a residual r_i given (the o and down projections of a pre-norm decoder layer), y_i + r_i: the
  base GEMM reads r_i in its epilogue (beta=1) instead of a separate add reading and writing the sum.
Backward (g_i = dL/dy_i, N x d_out_i):
    gmid_i = s_i g_i @ B_i                 (N, r_i)        with one s for the group: s applied in dx's and
                                                           dA's GEMMs instead
    dB_i   = s_i * g_i^T @ mid_i           (d_out_i, r_i)  fp32 output
    dA     = gmid^T @ x                    (R, d_in)       fp32 output, split per projection
    dx     = gmid @ A + sum_i g_i @ W_i    (N, d_in)       each base GEMM accumulates in place (beta=1)
    dy0_i  = g_i                           (4-bit bases: their own autograd adds g_i @ W_i)
    dr_i   = g_i

Saved for backward: x (which the caller's graph holds anyway), mid (N x R) and the tiny casted A and B.
What this replaces (peft 0.21 `lora.Linear.forward` with fp32 adapters): per projection an fp32 copy of x
(saved for backward), the update computed and added in fp32, and a cast back: three to five extra passes
over (N, d_out) and an (N, d_in) fp32 tensor kept alive until backward, times seven projections per layer.

Numerics: the update is computed from bf16-rounded A, B and mid with fp32 accumulation (s applied in fp32)
and added to the rounded base output (one rounding each); in the [x | s mid] path base and update share
one fp32 accumulator and one rounding, with s mid rounded to bf16 first (exact when s is a power of two,
as for alpha = 2r). peft rounds only the sum. In fp32 both are exact to rounding.
`lora_projections_ref` is peft's arithmetic, the tests' reference.
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


def _cat(ts) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _forward(x, scalings, values_unused, keep_dequantized, weights, biases, base_outs, residuals, lora_a, lora_b):
    """The outputs (..., d_out_i) and what the backward reads: (outs, mid, a_cat, b_c, kept weights)."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    # A cast once for the group, B cast and its scaling applied in the GEMMs' epilogues (alpha) or in the
    # [W | B] columns: the fewest small ops per call (this runs three times per layer and step with recomputation)
    a_cat = _cat(lora_a).to(dt)  # (R, d_in)
    mid = x2 @ a_cat.t()  # (N, R)
    if _concat_k(weights, scalings, [b.shape[0] for b in lora_b], x2.shape[1], values_unused):
        outs, b_c, kept = _forward_concat_k(x2, mid, weights, biases, residuals, lora_b, scalings[0],
                                            keep_dequantized)
    else:
        outs, b_c, kept = _forward_each(x2, mid, weights, biases, base_outs, residuals, lora_b, scalings,
                                        values_unused, keep_dequantized)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs], mid, a_cat, b_c, kept


class _LoRAProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scalings, values_unused, keep_dequantized, *tensors):
        n = len(scalings)
        weights, biases, base_outs = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n]
        residuals, lora_a, lora_b = tensors[3 * n:4 * n], tensors[4 * n:5 * n], tensors[5 * n:]
        outs, mid, a_cat, b_c, kept = _forward(x, scalings, values_unused, keep_dequantized, weights, biases,
                                               base_outs, residuals, lora_a, lora_b)
        ctx.has_residual = [r is not None for r in residuals]
        ctx.scalings = scalings
        ctx.has_weight = [w is not None for w in weights]
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
        scalings = ctx.scalings
        x2 = x.reshape(-1, x.shape[-1])
        g2 = [g.reshape(-1, g.shape[-1]) for g in grads]  # (N, d_out_i)
        # gmid_i = s_i g_i @ B_i. One scaling for the whole group (the usual case: one adapter, one rank):
        # gmid is kept unscaled and s applied where it is consumed (alpha of the dx GEMM, the small dA).
        s = scalings[0] if all(v == scalings[0] for v in scalings) else None
        gmids = [g @ b if s is not None else (g @ b).mul_(v) for g, b, v in zip(g2, b_c, scalings, strict=True)]
        gmid = torch.cat(gmids, dim=1) if n > 1 else gmids[0]  # (N, R)
        grad_b, off = [], 0
        for i, r in enumerate(ctx.ranks):
            grad_b.append(_mm_f32(g2[i].t(), mid[:, off:off + r]).mul_(scalings[i]))  # (d_out_i, r_i)
            off += r
        grad_a_cat = _mm_f32(gmid.t(), x2)  # (R, d_in)
        if s is not None and s != 1.0:
            grad_a_cat.mul_(s)
        grad_a = list(grad_a_cat.split(ctx.ranks)) if n > 1 else [grad_a_cat]
        grad_a = [_as(g, dt_a) for g, (dt_a, _) in zip(grad_a, ctx.adapter_dtypes, strict=True)]
        grad_b = [_as(g, dt_b) for g, (_, dt_b) in zip(grad_b, ctx.adapter_dtypes, strict=True)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            for i in range(n):
                if ctx.has_weight[i]:
                    w = ctx.weight_fns[i]() if ctx.weight_fns[i] is not None else next(weights)
                    # += g_i @ W_i, in the GEMM's epilogue
                    grad_x = torch.mm(g2[i], w) if grad_x is None else grad_x.addmm_(g2[i], w)
            alpha = 1.0 if s is None else s
            grad_x = (torch.mm(gmid, a_cat).mul_(alpha) if grad_x is None
                      else grad_x.addmm_(gmid, a_cat, alpha=alpha))  # + gmid @ A
            grad_x = grad_x.view_as(x)
        grad_y0 = [None if ctx.has_weight[i] else grads[i] for i in range(n)]
        grad_r = [grads[i] if ctx.has_residual[i] else None for i in range(n)]
        return (grad_x, None, None, None, *([None] * n), *([None] * n), *grad_y0, *grad_r, *grad_a, *grad_b)


def _base(x2, w, bias, residual):
    """x @ w^T (+ bias) (+ residual, read by the GEMM's epilogue)."""
    if residual is None:
        return torch.nn.functional.linear(x2, w, bias)
    y = torch.addmm(residual.reshape(-1, residual.shape[-1]), x2, w.t())
    return y if bias is None else y.add_(bias)


def _forward_each(x2, mid, weights, biases, base_outs, residuals, lora_b, scalings, values_unused: bool,
                  keep_dequantized: bool):
    """y_i = x @ W_i^T + b_i (+ r_i), then += s_i mid_i @ B_i^T in place (a K=r_i GEMM with beta=1), per
    projection. Returns (outputs (N, d_out_i), the casted B_i for backward, the kept dequantized weights)."""
    dt = x2.dtype
    b_c = [b.to(dt) for b in lora_b]  # (d_out_i, r_i)
    outs, kept, off = [], {}, 0
    for i, b in enumerate(b_c):
        r = b.shape[1]
        mid_i = mid[:, off:off + r]
        off += r
        if weights[i] is not None and values_unused:  # recompute: only what backward reads
            y = x2.new_empty(x2.shape[0], b.shape[0])
        elif weights[i] is not None:
            w = weights[i]() if callable(weights[i]) else weights[i]  # a 4-bit weight: dequantized now
            y = _base(x2, w, biases[i], residuals[i])  # (N, d_out_i)
            if keep_dequantized and callable(weights[i]):
                kept[i] = w
            del w
            y.addmm_(mid_i, b.t(), alpha=scalings[i])
        else:
            y0 = base_outs[i].reshape(-1, b.shape[0]).to(dt)
            if residuals[i] is not None:
                y0 = y0 + residuals[i].reshape(-1, b.shape[0])
            y = torch.addmm(y0, mid_i, b.t(), alpha=scalings[i])
        outs.append(y)
    return outs, b_c, kept


def _concat_k(weights, scalings, d_outs, d_in: int, values_unused: bool) -> bool:
    """Whether to run each projection as one GEMM over [x | s mid] and [W_i | B_pad_i] (module docstring):
    weights dequantized on demand (they are written into a fresh buffer anyway, so the B columns cost
    nothing), one scaling, and the group's outputs wider than its input (the K=r GEMM's pass over every
    output is what this removes; building [x | s mid] costs one pass over x)."""
    return (not values_unused and all(callable(w) for w in weights) and len(set(scalings)) == 1
            and sum(d_outs) > d_in)


def _forward_concat_k(x2, mid, weights, biases, residuals, lora_b, s: float, keep_dequantized: bool):
    """y_i = [x | s mid] @ [W_i | B_pad_i]^T (+ b_i) for every projection of the group, where B_pad_i is
    B_i in its own r_i columns of R and zeros in the others: the base and the update in one GEMM, one
    rounding. Returns (outputs, the casted B_i for backward, the kept dequantized weights)."""
    dt, d_in = x2.dtype, x2.shape[1]
    x_ext = torch.cat([x2, mid if s == 1.0 else mid * s], dim=1)  # (N, d_in + R)
    b_pad = torch.block_diag(*lora_b).to(dt)  # (sum d_out_i, R)
    b_c, outs, kept, row, col = [], [], {}, 0, 0
    for i, b in enumerate(lora_b):
        d_out, r = b.shape
        w_ext = x2.new_empty(d_out, x_ext.shape[1])
        w = weights[i](out=w_ext[:, :d_in])  # dequantized straight into its columns
        w_ext[:, d_in:].copy_(b_pad[row:row + d_out])
        outs.append(_base(x_ext, w_ext, biases[i], residuals[i]))
        if keep_dequantized:
            kept[i] = w
        b_c.append(b_pad[row:row + d_out, col:col + r])
        row, col = row + d_out, col + r
    return outs, b_c, kept


def lora_projections(x, lora_a, lora_b, scalings, *, weights=None, biases=None, base_outs=None, residuals=None,
                     values_unused: bool = False, keep_dequantized: bool = False):
    """y_i = x @ W_i^T + b_i + s_i (x @ A_i^T) @ B_i^T for each i, as one autograd node.

    x (..., d_in); lora_a[i] (r_i, d_in), lora_b[i] (d_out_i, r_i) trainable (any float dtype, fp32 for
    peft); weights[i] (d_out_i, d_in) and biases[i] frozen, or weights[i] None and base_outs[i] (..., d_out_i)
    the base output computed elsewhere (its gradient is passed through). weights[i] may also be a callable
    returning the (d_out_i, d_in) weight (a 4-bit weight dequantized on demand: called in the forward and
    again in the backward, never kept), as `fn()` or as `fn(out=buffer)` to write it into a given
    (d_out_i, d_in) view with contiguous rows. residuals[i] (..., d_out_i), optional: added to the output
    (y_i + r_i, the residual sum after a pre-norm layer's o or down projection; its gradient is g_i). The
    base GEMM reads it, so x W_i^T + r_i is rounded to r_i's grid before the LoRA update is added: in bf16
    an update under half an ulp of the residual is lost (distsft's patched models pass none; HF's decoder
    layers add the residual after the projection). Returns a tuple of (..., d_out_i).

    `values_unused`: the caller promises nothing will read the outputs' values, only backpropagate through
    them (a checkpointed layer's recompute, where the last projection feeds only the residual sum that
    leaves the layer): the GEMMs producing them are skipped and the outputs are uninitialised memory.
    The backward is unchanged (it reads x, mid and the weights, never the outputs).

    `keep_dequantized`: weights given as callables are called once, in the forward, and the result is
    kept for the backward (memory for time: a checkpointed layer's recompute runs right before its
    backward, so its dequantized weights live only that long).
    """
    n = len(lora_a)
    weights = list(weights) if weights is not None else [None] * n
    biases = list(biases) if biases is not None else [None] * n
    base_outs = list(base_outs) if base_outs is not None else [None] * n
    residuals = list(residuals) if residuals is not None else [None] * n
    for i in range(n):
        r = residuals[i]
        if r is not None and r.shape[-1] != lora_b[i].shape[0]:
            raise ValueError(f"projection {i}: residual has {r.shape[-1]} features, the output {lora_b[i].shape[0]}")
        if (weights[i] is None) == (base_outs[i] is None):
            raise ValueError(f"projection {i}: give exactly one of weights[i] and base_outs[i]")
        for name, t in (("weight", weights[i]), ("bias", biases[i])):
            if torch.is_tensor(t) and t.requires_grad:
                raise ValueError(f"projection {i}: the base {name} must be frozen (requires_grad=False)")
    scalings = tuple(float(s) for s in scalings)
    if not torch.is_grad_enabled():  # nothing to record (a checkpointed layer's first forward): no node
        return tuple(_forward(x, scalings, values_unused, False, weights, biases, base_outs, residuals, lora_a,
                              lora_b)[0])
    return _LoRAProjections.apply(x, scalings, bool(values_unused), bool(keep_dequantized), *weights, *biases,
                                  *base_outs, *residuals, *lora_a, *lora_b)


def lora_projections_ref(x, lora_a, lora_b, scalings, *, weights=None, biases=None, base_outs=None, residuals=None):
    """peft 0.21's arithmetic: base output in the input dtype, x cast to the adapter dtype, the update
    computed and added there, the sum cast back; then HF's residual sum (`residual + out`)."""
    n = len(lora_a)
    outs = []
    for i in range(n):
        if weights is not None and weights[i] is not None:
            y = torch.nn.functional.linear(x, weights[i], None if biases is None else biases[i])
        else:
            y = base_outs[i]
        xa = x.to(lora_a[i].dtype)
        out = (y + (xa @ lora_a[i].t()) @ lora_b[i].t() * scalings[i]).to(y.dtype)
        outs.append(out if residuals is None or residuals[i] is None else residuals[i] + out)
    return tuple(outs)
