"""bitsandbytes 4-bit (NF4 / FP4) weights to the compute dtype in one pass, double quantization included.

bitsandbytes' layout (`bitsandbytes.functional.quantize_4bit`): element e of the flattened (out, in)
weight is the nibble `data[e // 2] >> 4` (e even) or `data[e // 2] & 15` (e odd) of the packed uint8
storage (any storage dtype: ZeRO-3 keeps the bytes in bf16), an index into a 16-value code book
(NF4 or FP4), scaled by the absolute maximum of its block of `blocksize` elements:

    w[e] = round_to_dtype(code[nibble(e)] * absmax[e // blocksize])                      (fp32 product)

With double quantization ("nested", QLoRA's default) the absmax values are themselves stored as uint8
indices into an 8-bit dynamic code book, scaled per block of `blocksize2` absmax values, around an offset:

    absmax[j] = code2[absmax_q[j]] * absmax2[j // blocksize2] + offset       (two fp32 roundings)

bitsandbytes does this in two or three launches (the nested absmax into an fp32 buffer, the offset
added in place, then the 4-bit kernel), each behind several Python dispatch layers. A QLoRA step
dequantizes every base weight in the forward, the recompute and the backward (~640 calls for an 8B
model), so this kernel does it in one launch with a thin host path. Same roundings as bitsandbytes
(products and the offset sum rounded separately: fp fusion is off), so its output is bitwise equal.

`out=` writes the weight into the first columns of a wider row-major buffer (row stride > the row length):
the fused LoRA path dequantizes W into [W | B] and runs the base and the rank-r update as one GEMM.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launcher, cast_out


@triton.jit
def _dequant_4bit_kernel(
    A, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, n_bytes, n_out, out_stride,
    NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    # ROW > 0: element e goes to OUT[(e // ROW) * out_stride + e % ROW] (a constant divisor: shifts or a
    # multiply, not a division); ROW == 0: OUT is contiguous
    # BLOCK packed bytes (2 * BLOCK outputs) per program
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = b < n_bytes
    byte = tl.load(A + b, mask=mask, other=0).to(tl.int32)
    blk = (2 * b) // BLOCKSIZE  # both nibbles of a byte share a block (BLOCKSIZE is even)
    if NESTED:
        q = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q) * tl.load(ABSMAX2 + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(CODE + (byte >> 4)) * scale
    lo = tl.load(CODE + (byte & 15)) * scale
    vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))  # (hi0, lo0, hi1, lo1, ...): element order
    o = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    dst = o if ROW == 0 else (o // ROW) * out_stride + o % ROW
    tl.store(OUT + dst, cast_out(vals, OUT.dtype.element_ty), mask=o < n_out)


_dequant = Launcher(_dequant_4bit_kernel)  # a QLoRA step makes ~640 of these launches


@functools.lru_cache(maxsize=64)
def _launch(n_bytes: int) -> tuple[tuple[int], int, int]:
    """(grid, bytes per program, warps): 4K bytes (8K outputs, 16 KB of bf16) per program on a GPU."""
    block = 1 << 16 if INTERPRETED else 4096
    block = min(block, triton.next_power_of_2(max(n_bytes, 16)))
    return (triton.cdiv(n_bytes, block),), block, 8 if block >= 4096 else 4


def dequantize_4bit(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, *, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype, nested: tuple | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit weight `data` (packed, any storage dtype) as a `shape` tensor of `dtype`.

    absmax: fp32 per block of `blocksize` outputs, or uint8 with `nested = (absmax2, code2, blocksize2,
    offset)` (bitsandbytes' `quant_state.state2` fields and `quant_state.offset`). code: the 16 fp32
    values of the 4-bit code book (`quant_state.code`). out: where to write it instead of a new tensor,
    `shape` and `dtype`, contiguous rows (stride 1 along the last dimension) at any row stride (a column
    slice of a wider buffer).
    """
    n_out = 1
    for s in shape:
        n_out *= int(s)
    raw = data.view(torch.uint8) if data.dtype != torch.uint8 else data
    if not raw.is_contiguous():
        raise ValueError(f"dequantize_4bit: packed data must be contiguous, got strides {tuple(data.stride())}")
    n_bytes = (n_out + 1) // 2
    if raw.numel() < n_bytes or blocksize % 2 or blocksize & (blocksize - 1):
        raise ValueError(f"dequantize_4bit: {raw.numel()} packed bytes for {n_out} values, blocksize {blocksize} "
                         f"(needs >= {n_bytes} bytes and an even power-of-two blocksize)")
    row, out_stride = 0, 0
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != data.device:
        raise ValueError(f"dequantize_4bit: out is {tuple(out.shape)} {out.dtype} on {out.device}, the weight "
                         f"{tuple(shape)} {dtype} on {data.device}")
    elif not out.is_contiguous():
        if out.dim() != 2 or out.stride(1) != 1 or out.stride(0) < out.shape[1]:
            raise ValueError(f"dequantize_4bit: out must have contiguous rows (2-D, last stride 1), got strides "
                             f"{tuple(out.stride())}")
        row, out_stride = int(out.shape[1]), int(out.stride(0))
    grid, block, warps = _launch(n_bytes)
    if nested is not None:
        absmax2, code2, blocksize2, offset = nested
        if not torch.is_tensor(offset):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=data.device)
        tables, blocksize2 = (absmax2, code2, offset), int(blocksize2)
    else:
        tables, blocksize2 = (absmax, code, absmax), 1
    _dequant(grid, raw, absmax, code, *tables, out, n_bytes, n_out, out_stride, NESTED=nested is not None,
             BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, BLOCK=block, ROW=row, num_warps=warps,
             enable_fp_fusion=False)
    return out



def dequantize_4bit_state(data: torch.Tensor, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_4bit` from a bitsandbytes `QuantState` (what `bitsandbytes.functional.dequantize_4bit`
    takes): the weight in `state.dtype` (into `out` if given)."""
    nested = None
    if state.nested:
        s2 = state.state2
        nested = (s2.absmax, s2.code, s2.blocksize, state.offset)
    return dequantize_4bit(data, state.absmax, state.code, blocksize=state.blocksize, shape=tuple(state.shape),
                           dtype=state.dtype, nested=nested, out=out)
