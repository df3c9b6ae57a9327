"""Several small tensors cast to one dtype and laid end to end, in one launch: the LoRA adapters of a fused
projection group, fp32 master weights read in bf16 by the GEMMs.

    out = cat([t.reshape(-1) for t in tensors]).to(dtype)          (1-D, sum of the numels)

`lora_projections` needs, per group and pass, A = cat_i A_i (R, d_in) and each B_i (d_out_i, r_i) in the
compute dtype: with torch that is a cat and a cast for A and one cast per B, up to five launches for
q/k/v, each costing more host time than GPU time (kernel_costs_h100.md). A QLoRA step with recomputation builds
them ~200 times, and its host time is what the GPU waits on; here they are one launch, and the caller
takes (R, d_in) and (d_out_i, r_i) views of the result (row-major tensors laid end to end are their
concatenation along dim 0). The cast rounds to nearest even, as `Tensor.to` does, so the result is
bitwise equal to torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launcher, cast_out, cdiv

MAX_TENSORS = 8


@triton.jit
def _cast_concat_kernel(OUT, S0, S1, S2, S3, S4, S5, S6, S7, e0, e1, e2, e3, e4, e5, e6, total,
                        N: tl.constexpr, BLOCK: tl.constexpr):
    # e_k: where tensor k ends in OUT (cumulative numels), tensor N-1 ends at total; tensors past N are
    # never read. Each element is one tensor's (a select, not a sum: -0.0 and NaN come through as they are).
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(S0 + i, mask=i < e0, other=0.0).to(tl.float32)
    if N > 1:
        v = tl.where(i >= e0, tl.load(S1 + (i - e0), mask=(i >= e0) & (i < e1), other=0.0).to(tl.float32), v)
    if N > 2:
        v = tl.where(i >= e1, tl.load(S2 + (i - e1), mask=(i >= e1) & (i < e2), other=0.0).to(tl.float32), v)
    if N > 3:
        v = tl.where(i >= e2, tl.load(S3 + (i - e2), mask=(i >= e2) & (i < e3), other=0.0).to(tl.float32), v)
    if N > 4:
        v = tl.where(i >= e3, tl.load(S4 + (i - e3), mask=(i >= e3) & (i < e4), other=0.0).to(tl.float32), v)
    if N > 5:
        v = tl.where(i >= e4, tl.load(S5 + (i - e4), mask=(i >= e4) & (i < e5), other=0.0).to(tl.float32), v)
    if N > 6:
        v = tl.where(i >= e5, tl.load(S6 + (i - e5), mask=(i >= e5) & (i < e6), other=0.0).to(tl.float32), v)
    if N > 7:
        v = tl.where(i >= e6, tl.load(S7 + (i - e6), mask=(i >= e6) & (i < total), other=0.0).to(tl.float32), v)
    tl.store(OUT + i, cast_out(v, OUT.dtype.element_ty), mask=i < total)


_launch = Launcher(_cast_concat_kernel)


def cast_concat(tensors, dtype: torch.dtype) -> torch.Tensor:
    """`cat([t.reshape(-1) for t in tensors]).to(dtype)` in one launch: 1 to MAX_TENSORS contiguous fp32,
    bf16 or fp16 tensors on one device, into `dtype` (read in fp32, which holds all three exactly)."""
    n = len(tensors)
    if not 1 <= n <= MAX_TENSORS:
        raise ValueError(f"cast_concat: 1 to {MAX_TENSORS} tensors, got {n}")
    device = tensors[0].device
    for k, t in enumerate(tensors):
        if not t.is_contiguous() or t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
                t.device != device):
            raise ValueError(f"cast_concat: tensor {k} is {t.dtype} on {t.device} with strides {tuple(t.stride())} "
                             f"(needs contiguous fp32/bf16/fp16 on {device})")
    ends, total = [], 0
    for t in tensors:
        total += t.numel()
        ends.append(total)
    out = torch.empty(total, dtype=dtype, device=device)
    if total == 0:
        return out
    block = 1 << 14 if INTERPRETED else 2048
    srcs = list(tensors) + [tensors[0]] * (MAX_TENSORS - n)
    ends = (ends[:-1] + [total] * MAX_TENSORS)[:MAX_TENSORS - 1]
    _launch((cdiv(total, block),), out, *srcs, *ends, total, N=n, BLOCK=block, num_warps=4)
    return out
