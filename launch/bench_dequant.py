"""4-bit (NF4, double quantization: QLoRA's setting) weight dequantization: distsft's one-pass Triton kernel
against bitsandbytes' `dequantize_4bit` and the PyTorch reference, on Llama-3.1-8B's projection shapes.

    python launch/bench_dequant.py --out launch/results/dequant_h100.md

Per shape and provider: device time (median of triton.testing.do_bench, L2 flushed, over closures running
10 dequantizations back to back, captured in a CUDA graph so that host overhead is excluded), achieved
bandwidth as a share of a device-to-device copy measured here (bytes: packed weight + absmax read, output
written), and host time per call (a small weight dequantized 2,000 times without synchronising: what a
host-bound loop pays per call). The last table adds up one QLoRA step of the 8B model with recomputation
(each base weight dequantized in the forward, the recompute, where the down projection is skipped, and the
backward; 32 layers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
from bench_kernels import K, copy_bandwidth  # distsft_kernels, installed or from this checkout

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}
PER_STEP = {"q/o 4096x4096": 6, "k/v 1024x4096": 6, "gate/up 14336x4096": 6, "down 4096x14336": 2}
"""Dequantizations per layer and step with recomputation, per shape: q, o, k, v, gate, up three times each
(forward, recompute, backward), down twice (its recompute GEMMs are skipped)."""


def main(argv=None) -> None:
    import bitsandbytes as bnb
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_dequant.py needs a CUDA GPU")
    F = bnb.functional
    bw = copy_bandwidth(lambda f: do_bench(f, return_mode="median"))

    def providers(data, state):
        nested = (state.state2.absmax, state.state2.code, state.state2.blocksize, state.offset)
        return {
            "bitsandbytes": lambda: F.dequantize_4bit(data, state),
            "ours": lambda: K.dequantize_4bit_state(data, state),
            "torch reference": lambda: K.dequantize_4bit_ref(
                data, state.absmax, state.code, blocksize=state.blocksize, shape=tuple(state.shape), dtype=state.dtype,
                nested=nested),
        }

    def graph_ms(f, reps=10):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            f()
        stream.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                f()
        torch.cuda.synchronize()
        return do_bench(g.replay, return_mode="median") / reps

    rows, step = [], {}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
        data, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                      quant_storage=torch.uint8)
        del w
        expected = F.dequantize_4bit(data, state)
        nbytes = data.numel() + state.absmax.numel() + expected.numel() * 2
        for prov, fn in providers(data, state).items():
            assert torch.equal(fn(), expected), f"{prov} differs from bitsandbytes on {name}"
            ms = graph_ms(fn)
            step[prov] = step.get(prov, 0.0) + ms * PER_STEP[name] * args.layers
            rows.append(f"| {name} | {prov} | {ms * 1e3:.1f} | {nbytes / (ms * 1e-3) / bw:.0%} |")
            print(rows[-1], flush=True)
        del data, state, expected
        torch.cuda.empty_cache()

    # host time per call: a weight small enough that the GPU is never the bottleneck
    w = torch.randn(256, 256, dtype=torch.bfloat16, device="cuda")
    data, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    host = {}
    for prov, fn in providers(data, state).items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            fn()
        host[prov] = (time.perf_counter() - t) / 2000 * 1e6
        torch.cuda.synchronize()
    calls = sum(PER_STEP.values()) * args.layers

    import triton

    lines = [
        "# 4-bit dequantization (NF4, double quantization, bf16 out)", "",
        f"- GPU: {torch.cuda.get_device_name()}; device-to-device copy here: {bw / 1e9:.0f} GB/s (read + write)",
        f"- torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bnb.__version__}, "
        f"Python {sys.version.split()[0]}",
        f"- commit: {os.environ.get('DISTSFT_COMMIT', 'unknown')}",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python launch/bench_dequant.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "- every provider's output checked bitwise equal to bitsandbytes' before timing", "",
        "| weight | provider | device us per call (CUDA graph) | share of copy bandwidth |", "|---|---|---:|---:|",
        *rows, "",
        "Host time per call (256 x 256 weight, 2,000 calls, no synchronisation): "
        + ", ".join(f"{p} {us:.0f} us" for p, us in host.items()), "",
        f"One 8B QLoRA step with recomputation ({args.layers} layers, {calls} dequantizations): device time "
        + ", ".join(f"{p} {ms:.1f} ms" for p, ms in step.items())
        + "; host time " + ", ".join(f"{p} {host[p] * calls / 1e3:.1f} ms" for p in host), "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[-4:]))


if __name__ == "__main__":
    main()
