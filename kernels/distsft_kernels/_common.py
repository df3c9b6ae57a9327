"""Helpers shared by the kernel files: where Triton can run, launch sizes, program counts, the launcher,
and the spare-columns protocol between rms_norm and the fused LoRA projections.

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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code on every launch. `triton.cdiv` and `triton.next_power_of_2` are constexpr
    functions in Triton >= 3.5 (callable inside kernels too), slow to call from Python on every launch
    (launch/results/kernel_costs_h100.md)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as `triton.next_power_of_2` (see `cdiv`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


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


# ----------------------------------------------------------------------------------------------------
# Launching. `kernel[grid](*args, **meta)` re-derives, on every call, how each argument specializes the
# kernel (16-byte alignment of each pointer, each integer's value class, the constexprs) and looks the
# compiled kernel up: tens of microseconds of host time per launch on a GPU host (kernel_costs_h100.md),
# where a LoRA step with recomputation makes ~1,000 such launches and its host time is what the GPU waits
# on. `Launcher` keys the compiled kernel on those same properties (each integer's whole value, a superset
# of what Triton distinguishes), lets Triton's own launch compile it the first time a key is seen, and
# afterwards calls the compiled kernel directly: through the compiled kernel's C launcher where
# `DIRECT_C_LAUNCH` allows it (Triton's internal `CompiledKernel.run.launch`, whose argument list changes
# between releases: only on the releases in `DIRECT_C_LAUNCH_TRITON`, with no scratch memory; a launch
# made while a Triton launch hook is registered goes through the runner), else through
# `compiled[grid](...)`. Each direct call is checked once per process on a probe kernel (pointer, integer,
# float and constexpr arguments; a wrong argument order or a stale value would show) and given up, with a
# warning, if it fails or differs: then every launch takes Triton's path.

DIRECT_C_LAUNCH = True
"""Call Triton's internal C launcher directly (on the releases of `DIRECT_C_LAUNCH_TRITON` only). False:
the compiled kernel's own `compiled[grid](...)` after the first launch, still without the per-call
specialization."""

DIRECT_C_LAUNCH_TRITON = ((3, 6), (3, 7))
"""[first, end) Triton releases whose `CompiledKernel.run.launch` argument list `_c_launcher` was written
and checked against on a GPU (3.6). Widen it after `pytest -m gpu tests/kernels` passes on another."""


def _triton_release() -> tuple[int, int]:
    major, minor = (triton.__version__.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int(minor)


@triton.jit
def _launch_probe_kernel(X, n, f, C: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, i * n + f + C)


_direct_ok: bool | None = None  # None: not checked yet in this process
_Tensor = torch.Tensor
_get_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _arg_key(a):
    if isinstance(a, _Tensor):
        return a.dtype, not a.data_ptr() & 15
    if isinstance(a, (bool, int)):
        return type(a), a
    return type(a)  # floats are not specialized on; None and anything else by type


def _c_launcher(compiled, tail: tuple):
    """`fn(grid, args, device)` launching `compiled` through its C launcher: the last step of
    `compiled[grid](...)` without its three Python frames, and with no launch hooks passed while none is
    registered (Triton 3.6 passes its two empty hook chains, which the C launcher then calls on every launch).
    A launch made while a hook is registered (Triton's profiler) goes through `compiled[grid](...)`. None
    where this Triton's objects differ from what this expects or the call needs more than the plain
    launch (scratch memory), and where `DIRECT_C_LAUNCH` is off or this Triton is not one it was checked on."""
    first, end = DIRECT_C_LAUNCH_TRITON
    if not (DIRECT_C_LAUNCH and first <= _triton_release() < end):
        return None
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
        # a hook chain (Triton >= 3.4): its list of hooks, checked at each launch; a plain hook: not handled
        chains = tuple(h.calls for h in hooks if h is not None)
        if _get_stream is None or not all(isinstance(c, list) for c in chains):
            return None
        compiled._init_handles()
        run = compiled.run
        launch, function, packed = run.launch, compiled.function, compiled.packed_metadata
        if run.global_scratch_size or run.profile_scratch_size or not callable(launch):
            return None
        coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    except (AttributeError, ImportError):
        return None
    hooked = _runner_launcher(compiled, tail)

    def fn(grid, args, device):
        if any(chains):
            hooked(grid, args, device)
            return
        launch(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _get_stream(device),
               function, coop, pdl, None, None, packed, None, None, None, *args, *tail)

    return fn


def _runner_launcher(compiled, tail: tuple):
    def fn(grid, args, device):
        compiled[(*grid, 1, 1)[:3]](*args, *tail)

    return fn


class Launcher:
    """`Launcher(kernel)(grid, *args, **meta)` is `kernel[grid](*args, **meta)` (positional runtime
    arguments, then constexprs and launch options by name) with the compiled kernel called directly after
    the first launch of each specialization."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = kernel.arg_names
        self.compiled: dict = {}

    def __call__(self, grid, *args, **meta):
        if INTERPRETED or not (_direct_ok or _direct_ok is None and _check_direct()):
            self.kernel[grid](*args, **meta)
            return
        device = _get_device()
        key = (device, tuple([_arg_key(a) for a in args]), tuple(meta.items()))
        launch = self.compiled.get(key)
        if launch is None:
            compiled = self.kernel[grid](*args, **meta)
            tail = tuple(meta[n] for n in self.names[len(args):])
            self.compiled[key] = (_c_ok and _c_launcher(compiled, tail)) or _runner_launcher(compiled, tail)
            return
        launch(grid, args, device)

    def direct(self, args: tuple, meta: dict):
        """The direct launch `fn(grid, args, device)` recorded for arguments that specialize as `args` and
        `meta` do (after a call with such arguments), or None where launches take Triton's own path. A caller
        that launches the same specialization again and again (the same weights, the same kind of output)
        keeps it and skips `__call__`'s per-argument key."""
        if INTERPRETED or not _direct_ok:
            return None
        return self.compiled.get((_get_device(), tuple([_arg_key(a) for a in args]), tuple(meta.items())))


_c_ok = True  # the C-launcher path passed the probe (or is not checked yet)


def _check_direct() -> bool:
    """Check both direct paths once on the probe kernel; returns whether direct launches are on."""
    global _direct_ok, _c_ok
    import warnings

    try:
        x = torch.zeros(3, 16, dtype=torch.float32, device="cuda")
        expected = torch.arange(16, device="cuda", dtype=torch.float32) * 3 + 7
        compiled = _launch_probe_kernel[(1,)](x[0], 3, 0.5, C=7, BLOCK=16)
        device = _get_device()
        for row, (build, f) in enumerate(((_c_launcher, 2.25), (_runner_launcher, -1.5)), start=1):
            launch = build(compiled, (7, 16))
            if launch is None:  # this Triton's objects are not what the C path expects: runner only
                _c_ok = False
                continue
            try:
                launch((1,), (x[row], 3, f), device)
                if not torch.equal(x[row], expected + f):
                    raise RuntimeError(f"a direct launch wrote {x[row].tolist()}")
            except Exception as e:  # noqa: BLE001
                if build is _runner_launcher:
                    raise
                _c_ok = False
                warnings.warn(f"Triton's C launcher cannot be called directly ({e}); launching through the "
                              "compiled kernel instead", RuntimeWarning, stacklevel=3)
        _direct_ok = True
    except Exception as e:  # noqa: BLE001 (any failure: Triton's own launch path from now on)
        warnings.warn(f"direct kernel launches unavailable with this Triton ({e}); using its regular launch path",
                      RuntimeWarning, stacklevel=3)
        _direct_ok = False
    return _direct_ok


# ----------------------------------------------------------------------------------------------------
# Spare columns: rms_norm's output rows followed by room for the fused LoRA's [x | mid] (lora.py).
# The norm before a fused q/k/v or gate/up group on 4-bit bases leaves R = sum of the group's ranks
# writable columns after each row; the group writes mid = [s_i x A_i^T] there and runs one GEMM over
# [x | mid] with no copy of x. Off (`SPARE_COLUMNS = False`): rms_norm makes plain outputs and the group
# builds [x | mid] by concatenation; the results are the same bit for bit (tests/kernels/test_lora.py).

SPARE_COLUMNS = True
"""rms_norm honours `spare_cols` (read at each call)."""

SPARE_COLS_ATTR = "_distsft_spare_cols"
"""Set on a tensor made by `with_spare_cols` (rms_norm's `spare_cols`): how many writable columns follow
each of its rows."""


def with_spare_cols(shape, spare: int, dtype, device) -> torch.Tensor:
    """A tensor of `shape` whose rows (last dim) are each followed by `spare` columns of its own storage
    that no tensor element covers. Not a view (no autograd view base, its own version counter): writing
    those columns through another tensor on the same storage leaves this one's values and version as
    they are."""
    d = shape[-1]
    rows = 1
    for n in shape[:-1]:
        rows *= n
    storage = torch.empty(rows * (d + spare), dtype=dtype, device=device).untyped_storage()
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = (d + spare) if i == len(shape) - 2 else strides[i + 1] * shape[i + 1]
    y = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, tuple(shape), tuple(strides))
    setattr(y, SPARE_COLS_ATTR, spare)
    return y


def spare_columns(x: torch.Tensor, width: int, claim: bool = False) -> torch.Tensor | None:
    """For x made by `rms_norm(..., spare_cols >= width)`: the (rows, d + width) matrix of its rows and the
    `width` spare columns after each, on x's storage (for the fused LoRA's [x | mid]: mid written there,
    no copy of x), else None. `claim`: the caller keeps what it writes there (a saved mid), so x's spare
    columns are handed out once: a second reader of x (up_proj after gate_proj where they are not fused
    into one group) gets None and builds its own [x | mid]."""
    if getattr(x, SPARE_COLS_ATTR, 0) < width or x.dim() < 2 or x.stride(-1) != 1:
        return None
    if claim:
        setattr(x, SPARE_COLS_ATTR, 0)
    d, stride = x.shape[-1], x.stride(-2)
    rows = x.numel() // d if d else 0
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(
        x.untyped_storage(), x.storage_offset(), (rows, d + width), (stride, 1))
