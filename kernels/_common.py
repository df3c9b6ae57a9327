"""Helpers shared by the kernel files: where Triton can run, launch sizes, program counts.

Triton decides at decoration time (`@triton.jit`) whether a kernel is compiled for a GPU or run by its
CPU interpreter: `TRITON_INTERPRET=1` must be set before the kernel modules are imported. `INTERPRETED`
records what actually happened, so the backend choice never launches a compiled kernel on CPU tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(X):
    tl.store(X, 0)


INTERPRETED: bool = type(_probe_kernel).__name__ == "InterpretedFunction"
"""True when this process's kernels run under the Triton CPU interpreter."""


_RTNE_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even. Compiled Triton rounds so already; the interpreter
    truncates fp32 -> bf16 (and its `fp_downcast_rounding="rtne"` is ignored), so round by hand there:
    without it the kernels would differ from torch by up to one bf16 ulp everywhere under test."""
    if _RTNE_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def triton_can_run(t: torch.Tensor) -> bool:
    """Can our kernels take this tensor? Compiled: CUDA tensors; interpreted: CPU tensors."""
    return t.device.type == "cpu" if INTERPRETED else t.is_cuda


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device, default: int = 4) -> int:
    """Programs of a persistent (grid-stride) kernel: the device's SM count, a few under the interpreter."""
    if device.type == "cuda" and not INTERPRETED:
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return default


def row_block(n_cols: int, max_elems: int = 8192) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) for a row-wise kernel: the whole row in one block (n_cols padded to a
    power of two), several short rows per program so that each program moves >= ~4K elements."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, max_elems // block_n))
    if INTERPRETED:  # the interpreter's cost is per program: fewer, bigger programs
        block_m = max(block_m, 16)
    elems = block_n * block_m
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_n, block_m, num_warps
