"""GPU time of the LoRA weight-gradient GEMMs of one 8B decoder layer at 4,096 tokens, per formulation.

    python launch/tools/probes/lora_wgrad_gemms.py [--tokens 4096] [--rank 16]

dB_i = g_i^T @ mid_i is (d_out, r) with K = tokens and dA = gmid^T @ x is (R, d_in) with K = tokens: a
narrow output and a long reduction, where cuBLAS's choice of kernel depends on which side is narrow and
on the output dtype. Each row times one formulation of the same product (same result up to fp32
rounding; checked against the first row): the fp32 result straight from the GEMM (`out_dtype`, what
kernels/distsft_kernels/lora.py does), a bf16 result cast afterwards, and the transposed product (narrow side first).
Median of --reps CUDA-event timings after warm-up.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def timed(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def variants(left: torch.Tensor, right: torch.Tensor) -> dict:
    """left^T @ right (left (K, m), right (K, n)): an (m, n) fp32 result, several ways."""
    return {
        "mm(L^T, R, out_dtype=fp32)": lambda: torch.mm(left.t(), right, out_dtype=torch.float32),
        "mm(L^T, R).float()": lambda: torch.mm(left.t(), right).float(),
        "mm(R^T, L, out_dtype=fp32).t()": lambda: torch.mm(right.t(), left, out_dtype=torch.float32).t(),
        "mm(R^T, L).float().t()": lambda: torch.mm(right.t(), left).float().t(),
        "fp32 inputs mm(L^T, R)": lambda: torch.mm(left.t().float(), right.float()),
        **{f"split-K {k}: bmm + sum": (lambda k=k: split_k(left, right, k)) for k in (4, 8, 16, 32)},
    }


def split_k(left: torch.Tensor, right: torch.Tensor, k: int) -> torch.Tensor:
    """left^T @ right as k partial products over slices of the reduction (one batched GEMM), summed in fp32."""
    K, m = left.shape
    parts = torch.bmm(left.view(k, K // k, m).transpose(1, 2), right.view(k, K // k, -1), out_dtype=torch.float32)
    return parts.sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, r, h, f, kv = args.tokens, args.rank, args.hidden, args.inter, args.kv
    bf = dict(device="cuda", dtype=torch.bfloat16)
    # (name, left (K, m), right (K, n), calls per layer): dB = g^T @ mid, dA = gmid^T @ x
    cases = [
        ("dB q/o/down (4096 x r)", torch.randn(n, h, **bf), torch.randn(n, r, **bf), 3),
        ("dB k/v (1024 x r)", torch.randn(n, kv, **bf), torch.randn(n, r, **bf), 2),
        ("dB gate/up (14336 x r)", torch.randn(n, f, **bf), torch.randn(n, r, **bf), 2),
        ("dA qkv (3r x 4096)", torch.randn(n, 3 * r, **bf), torch.randn(n, h, **bf), 1),
        ("dA gate/up (2r x 4096)", torch.randn(n, 2 * r, **bf), torch.randn(n, h, **bf), 1),
        ("dA o (r x 4096)", torch.randn(n, r, **bf), torch.randn(n, h, **bf), 1),
        ("dA down (r x 14336)", torch.randn(n, r, **bf), torch.randn(n, f, **bf), 1),
    ]
    names = list(variants(cases[0][1], cases[0][2]))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, tokens {n}, rank {r}; µs per call")
    print("| product | calls/layer | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    per_layer = dict.fromkeys(names, 0.0)
    for label, left, right, calls in cases:
        vs = variants(left, right)
        ref = vs[names[0]]()
        cells = []
        for name, fn in vs.items():
            err = (fn() - ref).abs().max().item() / ref.abs().max().item()
            us = timed(fn, args.reps)
            per_layer[name] += calls * us
            cells.append(f"{us:.1f}" + ("" if err < 1e-2 else f" (rel err {err:.1e})"))
        print(f"| {label} | {calls} | " + " | ".join(cells) + " |")
    print("| per layer (sum) | | " + " | ".join(f"{per_layer[k]:.0f}" for k in names) + " |")


if __name__ == "__main__":
    main()
