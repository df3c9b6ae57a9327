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

from ._common import INTERPRETED, Launcher, _get_device, cast_out, cdiv, next_pow2


@triton.jit
def _dequant_4bit_kernel(
    A, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, OUT, n_bytes, n_out, out_stride,
    TAIL, tail_rows, tail_cols, tail_col0, tail_width, n_weight_programs,
    NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr,
    ROW: tl.constexpr, HAS_TAIL: tl.constexpr, TAIL_ROWS: tl.constexpr, TAIL_W: tl.constexpr,
):
    # ROW > 0: element e goes to OUT[(e // ROW) * out_stride + e % ROW] (a constant divisor: shifts or a
    # multiply, not a division); ROW == 0: OUT is contiguous
    # HAS_TAIL: the programs after the first n_weight_programs write each row's tail_width columns after
    # the weight's ROW (zeros, TAIL's tail_cols columns from tail_col0 on), TAIL_ROWS rows per program
    pid = tl.program_id(0)
    if HAS_TAIL and pid >= n_weight_programs:
        # (names of their own: Triton wants a name bound in both branches to have one type)
        t_rows = (pid - n_weight_programs).to(tl.int64) * TAIL_ROWS + tl.arange(0, TAIL_ROWS)
        t_cols = tl.arange(0, TAIL_W)
        t_in_rows = (t_rows < tail_rows)[:, None]
        t_from_b = ((t_cols >= tail_col0) & (t_cols < tail_col0 + tail_cols))[None, :]
        t_vals = tl.load(TAIL + t_rows[:, None] * tail_cols + (t_cols - tail_col0)[None, :],
                         mask=t_in_rows & t_from_b, other=0.0).to(tl.float32)
        tl.store(OUT + t_rows[:, None] * out_stride + ROW + t_cols[None, :], cast_out(t_vals, OUT.dtype.element_ty),
                 mask=t_in_rows & (t_cols < tail_width)[None, :])
    else:
        # BLOCK packed bytes (2 * BLOCK outputs) per program
        b = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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
        o = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
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
    return Dequantizer(data, absmax, code, blocksize=blocksize, shape=shape, dtype=dtype, nested=nested)(out)


class Dequantizer:
    """`dequantize_4bit` of one packed weight with its arguments checked once: `Dequantizer(...)(out=None)`
    is `dequantize_4bit(..., out=out)`, and after the first call for a given kind of `out` (new, or a column
    slice of a given row stride) a call costs little more than the kernel launch (a QLoRA step with
    recomputation dequantizes each base weight three times, ~640 calls for an 8B model). It holds the
    tensors it was built from: build a new one when the weight or its quantization state is replaced.
    Packed bytes that move between calls (a ZeRO-3 parameter lives in a new buffer after every gather)
    are given per call instead, `fn(out, data=param.data)`, checked for size, layout and device only; with
    `hold_data=False` the Dequantizer keeps no reference to the bytes it was built from (a held gathered
    buffer would stay allocated after DeepSpeed releases the parameter)."""

    def __init__(self, data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, *, blocksize: int,
                 shape: tuple[int, ...], dtype: torch.dtype, nested: tuple | None = None, hold_data: bool = True):
        n_out = 1
        for s in shape:
            n_out *= int(s)
        raw = data.view(torch.uint8) if data.dtype != torch.uint8 else data
        if not raw.is_contiguous():
            raise ValueError(f"dequantize_4bit: packed data must be contiguous, got strides {tuple(data.stride())}")
        n_bytes = (n_out + 1) // 2
        if raw.numel() < n_bytes or blocksize % 2 or blocksize & (blocksize - 1):
            raise ValueError(f"dequantize_4bit: {raw.numel()} packed bytes for {n_out} values, blocksize "
                             f"{blocksize} (needs >= {n_bytes} bytes and an even power-of-two blocksize)")
        if nested is not None:
            absmax2, code2, blocksize2, offset = nested
            if not torch.is_tensor(offset):
                offset = torch.tensor(float(offset), dtype=torch.float32, device=data.device)
            tables, blocksize2 = (absmax2, code2, offset), int(blocksize2)
        else:
            tables, blocksize2 = (absmax, code, absmax), 1
        self.shape, self.dtype, self.device = tuple(int(s) for s in shape), dtype, data.device
        self.n_bytes, self.n_out = n_bytes, n_out
        self.data = raw if hold_data else None
        self.tables = (absmax, code, *tables)
        grid, block, warps = _launch(n_bytes)
        self.grid = grid
        self.meta = dict(NESTED=nested is not None, BLOCKSIZE=int(blocksize), BLOCKSIZE2=blocksize2, BLOCK=block,
                         num_warps=warps, enable_fp_fusion=False)
        self._launches: dict = {}  # (device, ROW, out row stride, out 16-byte aligned) -> fn(grid, args, device)

    def __call__(self, out: torch.Tensor | None = None, tail: tuple | None = None,
                 data: torch.Tensor | None = None) -> torch.Tensor:
        """The weight, into `out` when given. `tail = (b, col, width)`, with `out` a column slice of a
        wider buffer: also write the `width` columns that follow `out` in each of its rows, zeros but
        `b` (rows x r, contiguous, any float dtype, cast) in columns col .. col + r - 1 of them (the
        [W | B_pad] operand of distsft_kernels.lora_projections, in the same launch as W). `data`: the
        packed bytes to read this time (the same weight, wherever it lies now); default those it was
        built from."""
        if data is None:
            raw = self.data
            if raw is None:
                raise ValueError("dequantize_4bit: this Dequantizer was built with hold_data=False: pass data=")
        else:
            raw = data.view(torch.uint8) if data.dtype != torch.uint8 else data
            if raw.numel() < self.n_bytes or not raw.is_contiguous() or raw.device != self.device:
                raise ValueError(f"dequantize_4bit: data has {raw.numel()} bytes on {raw.device} (contiguous: "
                                 f"{raw.is_contiguous()}), the weight needs {self.n_bytes} contiguous on {self.device}")
        row = out_stride = 0
        if out is None:
            if tail is not None:
                raise ValueError("dequantize_4bit: tail= needs out= (a column slice of the wider buffer)")
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        elif out.shape != self.shape or out.dtype != self.dtype or out.device != self.device:
            raise ValueError(f"dequantize_4bit: out is {tuple(out.shape)} {out.dtype} on {out.device}, the weight "
                             f"{self.shape} {self.dtype} on {self.device}")
        elif not out.is_contiguous() or tail is not None:
            if out.dim() != 2 or out.stride(1) != 1 or out.stride(0) < out.shape[1]:
                raise ValueError(f"dequantize_4bit: out must have contiguous rows (2-D, last stride 1), got "
                                 f"strides {tuple(out.stride())}")
            row, out_stride = self.shape[1], out.stride(0)
        grid, tail_args, tail_meta = self.grid, (raw, 0, 0, 0, 0, 0), (False, 1, 1)
        if tail is not None:
            b, col, width = tail
            rows, cols = self.shape[0], b.shape[-1]
            if (b.dim() != 2 or b.shape[0] != rows or not b.is_contiguous() or not b.is_floating_point()
                    or b.device != self.device or col < 0 or col + cols > width or row + width > out_stride):
                raise ValueError(f"dequantize_4bit: tail {tuple(b.shape)} {b.dtype} at column {col} of {width} "
                                 f"(needs a contiguous float ({rows}, r) tensor on {self.device} and col + r <= "
                                 f"width <= out's row stride {out_stride} - {row})")
            tail_w = next_pow2(width)
            tail_rows = max(1, min(64, 4096 // tail_w))
            tail_args = (b, rows, cols, int(col), int(width), grid[0])
            tail_meta = (True, tail_rows, tail_w)
            grid = (grid[0] + cdiv(rows, tail_rows),)
        args = (raw, *self.tables, out, self.n_bytes, self.n_out, out_stride, *tail_args)
        device = _get_device() if out.is_cuda else None
        key = (device, row, out_stride, not out.data_ptr() & 15, tail_meta,
               tail and (tail_args[0].dtype, not tail_args[0].data_ptr() & 15, *tail_args[1:5]))
        launch = self._launches.get(key)
        if launch is None:
            meta = dict(self.meta, ROW=row, HAS_TAIL=tail_meta[0], TAIL_ROWS=tail_meta[1], TAIL_W=tail_meta[2])
            _dequant(grid, *args, **meta)
            self._launches[key] = _dequant.direct(args, meta) or functools.partial(_launch_with, meta)
        else:
            launch(grid, args, device)
        return out

    @classmethod
    def from_state(cls, data: torch.Tensor, state, hold_data: bool = True) -> Dequantizer:
        """From a bitsandbytes `QuantState`: the weight in `state.dtype`."""
        return cls(data, state.absmax, state.code, blocksize=state.blocksize, shape=tuple(state.shape),
                   dtype=state.dtype, nested=_nested(state), hold_data=hold_data)


def _nested(state) -> tuple | None:
    if not state.nested:
        return None
    s2 = state.state2
    return (s2.absmax, s2.code, s2.blocksize, state.offset)


def _launch_with(meta, grid, args, device) -> None:
    _dequant(grid, *args, **meta)


def dequantize_4bit_state(data: torch.Tensor, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize_4bit` from a bitsandbytes `QuantState` (what `bitsandbytes.functional.dequantize_4bit`
    takes): the weight in `state.dtype` (into `out` if given)."""
    return Dequantizer.from_state(data, state)(out)
