"""Host time per kernel launch on the GPU machine: what one 4-bit dequantization (an 8B projection's row
width, nested absmax, 16 arguments, few rows so that the GPU keeps up) costs the CPU through each launch
path, against two plain torch ops for scale. A QLoRA step makes ~1,000 Triton launches and is host-bound,
so microseconds here are milliseconds per step.

    python launch/tools/probes/launch_overhead.py [--n 20000]

Rows: Triton's own `kernel[grid](...)`; `Launcher` calling the compiled kernel's runner
(`compiled[grid](...)`); `Launcher` calling the C launcher directly (kernels/distsft_kernels/_common.py); the whole
`dequantize_4bit(..., out=)` (argument checks, then the launch); a `Dequantizer` built once and called
with `out` (what distsft's 4-bit layers do); and `torch.empty` / `Tensor.add_`.
"""

from __future__ import annotations

import argparse
import time


def per_call_us(fn, n: int) -> float:
    import torch

    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
        torch.cuda.synchronize()
    return 1e6 * best / n


def main() -> None:
    import distsft_kernels._common as C
    import distsft_kernels.dequant as D
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    rows, cols, bs, bs2 = 16, 4096, 64, 256
    n_out = rows * cols
    g = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randint(0, 256, ((n_out + 1) // 2, 1), dtype=torch.uint8, device="cuda", generator=g)
    absmax = torch.randint(0, 256, (n_out // bs,), dtype=torch.uint8, device="cuda", generator=g)
    absmax2 = torch.rand(n_out // bs // bs2, device="cuda", generator=g)
    code = torch.linspace(-1, 1, 16, device="cuda")
    code2 = torch.linspace(-1, 1, 256, device="cuda")
    nested = (absmax2, code2, bs2, torch.tensor(0.01, device="cuda"))
    buf = torch.empty(rows, cols + 32, dtype=torch.bfloat16, device="cuda")
    out = buf[:, :cols]
    call = dict(blocksize=bs, shape=(rows, cols), dtype=torch.bfloat16, nested=nested)
    D.dequantize_4bit(data, absmax, code, **call, out=out)  # compile; checks the direct paths once
    n_bytes = (n_out + 1) // 2
    grid, block, warps = D._launch(n_bytes)
    largs = (data, absmax, code, absmax2, code2, nested[3], out, n_bytes, n_out, cols + 32, data, 0, 0, 0, 0, 0)
    meta = dict(NESTED=True, BLOCKSIZE=bs, BLOCKSIZE2=bs2, BLOCK=block, ROW=cols, HAS_TAIL=False, TAIL_ROWS=1,
                TAIL_W=1, num_warps=warps, enable_fp_fusion=False)
    kernel = D._dequant.kernel
    runner = C.Launcher(kernel)
    c_ok = C._c_ok
    C._c_ok = False
    runner(grid, *largs, **meta)  # first call: compiled by Triton, runner path recorded
    C._c_ok = c_ok
    direct = C.Launcher(kernel)
    direct(grid, *largs, **meta)
    deq = D.Dequantizer(data, absmax, code, **call)
    deq(out)
    x = torch.ones(16, device="cuda")
    table = [
        ("Triton kernel[grid](...)", lambda: kernel[grid](*largs, **meta)),
        ("Launcher, compiled[grid](...)", lambda: runner(grid, *largs, **meta)),
        ("Launcher, C launcher" + ("" if c_ok else " (unavailable: runner)"), lambda: direct(grid, *largs, **meta)),
        ("dequantize_4bit(..., out=) (arguments checked per call)",
         lambda: D.dequantize_4bit(data, absmax, code, **call, out=out)),
        ("Dequantizer(...)(out) (checked once, launch kept)", lambda: deq(out)),
        ("torch.empty(16)", lambda: torch.empty(16, device="cuda")),
        ("Tensor.add_(1)", lambda: x.add_(1)),
    ]
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    print("| path | host us per call |\n| --- | --- |")
    for name, fn in table:
        print(f"| {name} | {per_call_us(fn, args.n):.1f} |")


if __name__ == "__main__":
    main()
