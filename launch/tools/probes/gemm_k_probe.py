"""GEMM time and launches against the reduction length K, on the GPU machine: `linear(x, w)` for x (4096, K)
and w (d_out, K) in bf16 at Llama-3.1-8B's projection widths, K from 4096 to 4224 (the fused LoRA's
[x | mid] @ [W | B_pad]^T has K = d_in + R), CUDA-event time per call and the kernels cuBLAS launched; then
the LoRA backward's gmid GEMM (4096 x d_out) @ (d_out x 16) as `mm` and as `addmm_(beta=0, alpha=2)`.

    python launch/tools/probes/gemm_k_probe.py
"""

from __future__ import annotations


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    def us_per_call(fn, n: int = 50) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(n):
            fn()
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1) / n * 1e3

    def kernels(fn) -> str:
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        return ", ".join(e.name[:50] for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    torch.manual_seed(0)
    n_tok = 4096
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| d_out | K | us per call | kernels |\n| --- | --- | --- | --- |")
    for d_out in (4096, 1024, 14336):
        for k in (4096, 4112, 4128, 4144, 4160, 4224):
            x = torch.randn(n_tok, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(d_out, k, device="cuda", dtype=torch.bfloat16)
            fn = lambda x=x, w=w: torch.nn.functional.linear(x, w)  # noqa: E731
            print(f"| {d_out} | {k} | {us_per_call(fn):.1f} | {kernels(fn)} |")
    print("| gmid: d_out | call | us per call | kernels |\n| --- | --- | --- | --- |")
    for d_out in (4096, 14336):
        g = torch.randn(n_tok, d_out, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(d_out, 16, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(n_tok, 16, device="cuda", dtype=torch.bfloat16)
        for name, fn in (("mm", lambda g=g, b=b: torch.mm(g, b)),
                         ("addmm_(beta=0, alpha=2)", lambda g=g, b=b, out=out: out.addmm_(g, b, beta=0, alpha=2.0))):
            print(f"| {d_out} | {name} | {us_per_call(fn):.1f} | {kernels(fn)} |")


if __name__ == "__main__":
    main()
