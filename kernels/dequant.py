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
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, cast_out


@triton.jit
def _dequant_4bit_kernel(
    A, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, n_bytes, n_out,
    NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr,
):
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
    tl.store(OUT + o, cast_out(vals, OUT.dtype.element_ty), mask=o < n_out)


@functools.lru_cache(maxsize=64)
def _launch(n_bytes: int) -> tuple[tuple[int], int, int]:
    """(grid, bytes per program, warps): 4K bytes (8K outputs, 16 KB of bf16) per program on a GPU."""
    block = 1 << 16 if INTERPRETED else 4096
    block = min(block, triton.next_power_of_2(max(n_bytes, 16)))
    return (triton.cdiv(n_bytes, block),), block, 8 if block >= 4096 else 4


def dequantize_4bit(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, *, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype, nested: tuple | None = None) -> torch.Tensor:
    """The 4-bit weight `data` (packed, any storage dtype) as a `shape` tensor of `dtype`.

    absmax: fp32 per block of `blocksize` outputs, or uint8 with `nested = (absmax2, code2, blocksize2,
    offset)` (bitsandbytes' `quant_state.state2` fields and `quant_state.offset`). code: the 16 fp32
    values of the 4-bit code book (`quant_state.code`).
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
    out = torch.empty(shape, dtype=dtype, device=data.device)
    grid, block, warps = _launch(n_bytes)
    if nested is not None:
        absmax2, code2, blocksize2, offset = nested
        if not torch.is_tensor(offset):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=data.device)
        args = (raw, absmax, code, absmax2, code2, offset, out, n_bytes, n_out, True, blocksize, int(blocksize2), block)
    else:
        args = (raw, absmax, code, absmax, code, absmax, out, n_bytes, n_out, False, blocksize, 1, block)
    _run(grid, warps, args)
    return out


# ----------------------------------------------------------------------------------------------------
# Launching. A QLoRA step launches this kernel ~640 times, and Triton's `kernel[grid](...)` spends most of
# its host time (~40 us a call on the GPU machine's host, which is what the step waits on) re-deriving the
# specialization of every argument and looking up the compiled kernel. Both depend only on the argument
# properties Triton specializes on (16-byte alignment of each pointer; each integer's value, which is in
# the key whole; the constexprs), so the compiled kernel found by the first launch of a key is launched
# directly afterwards. The direct launch is checked once per process against the regular one (bitwise,
# with a synchronisation) and abandoned, with a warning, if it differs or fails (a Triton version whose
# compiled-kernel API differs).

_compiled: dict = {}
_direct_ok: bool | None = None  # None: not checked yet in this process


def _run(grid, warps, args) -> None:
    global _direct_ok
    if INTERPRETED or _direct_ok is False:
        _dequant_4bit_kernel[grid](*args[:9], NESTED=args[9], BLOCKSIZE=args[10], BLOCKSIZE2=args[11],
                                   BLOCK=args[12], num_warps=warps, enable_fp_fusion=False)
        return
    out = args[6]
    key = (out.device.index, out.dtype, *(t.data_ptr() % 16 == 0 for t in args[:7]), *args[7:])
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = _dequant_4bit_kernel[grid](*args[:9], NESTED=args[9], BLOCKSIZE=args[10],
                                                    BLOCKSIZE2=args[11], BLOCK=args[12], num_warps=warps,
                                                    enable_fp_fusion=False)
        return
    try:
        compiled[(grid[0], 1, 1)](*args)
        if _direct_ok is None:
            check = torch.empty_like(out)
            _dequant_4bit_kernel[grid](*args[:6], check, *args[7:9], NESTED=args[9], BLOCKSIZE=args[10],
                                       BLOCKSIZE2=args[11], BLOCK=args[12], num_warps=warps, enable_fp_fusion=False)
            if not torch.equal(check, out):
                raise RuntimeError("the direct launch's output differs from the regular launch's")
            _direct_ok = True
    except Exception as e:  # noqa: BLE001 (any failure: fall back to Triton's own launch path for good)
        import warnings

        warnings.warn(f"dequantize_4bit: direct kernel launch unavailable with this Triton ({e}); using the "
                      "regular launch path", RuntimeWarning, stacklevel=3)
        _direct_ok = False
        _run(grid, warps, args)


def dequantize_4bit_state(data: torch.Tensor, state) -> torch.Tensor:
    """`dequantize_4bit` from a bitsandbytes `QuantState` (what `bitsandbytes.functional.dequantize_4bit`
    takes): the weight in `state.dtype`."""
    nested = None
    if state.nested:
        s2 = state.state2
        nested = (s2.absmax, s2.code, s2.blocksize, state.offset)
    return dequantize_4bit(data, state.absmax, state.code, blocksize=state.blocksize, shape=tuple(state.shape),
                           dtype=state.dtype, nested=nested)
