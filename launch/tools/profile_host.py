"""Where a training step's host (CPU) time goes, on the GPU machine: the same model as launch/bench_e2e.py,
one step under cProfile (top functions by own time and by cumulative time), the host time to enqueue a
step against the step's wall time, and any host-device synchronisation inside the step
(torch.cuda.set_sync_debug_mode). `--phases` adds, for the forward, the backward and the optimizer step each
started on an idle GPU: the host's time to enqueue the phase, the phase's wall time, and the GPU's kernel time
in it (torch.profiler), so a phase the host holds back (wall close to its host time, GPU time well below)
shows apart from one the GPU holds back; and the kernels with the most GPU time in a step.

    python launch/tools/profile_host.py --qlora --gc --offload --case llama3-8b:2x2048 --phases
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import bench_e2e
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="llama3-8b:2x2048")
    ap.add_argument("--provider", default="distsft")
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--phases", action="store_true", help="per-phase host / wall / GPU-kernel time, top kernels")
    ap.add_argument("--keep-dequant", action="store_true")
    args = ap.parse_args()
    shape, bt = args.case.split(":")
    batch, seq = (int(v) for v in bt.split("x"))
    model, config, loss_fn = bench_e2e.build(args.provider, shape, args.gc, offload=args.offload, qlora=args.qlora,
                                             **({"keep_dequant": True} if args.keep_dequant else {}))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls, enqueues = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        enqueues.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    print(f"step wall {1e3 * min(walls):.1f} ms (min of 5), host returns after {1e3 * min(enqueues):.1f} ms")
    if args.phases:
        phases(step, loss_fn, ids, opt)
    torch.cuda.set_sync_debug_mode("warn")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:80]}" for w in caught
             if "synchroniz" in str(w.message)]
    print(f"synchronising calls inside one step: {len(syncs)}", *sorted(set(syncs))[:10], sep="\n  ")
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
        print("\n".join(line[:160] for line in buf.getvalue().splitlines() if line.strip()))


def phases(step, loss_fn, ids, opt) -> None:
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    def gpu_ms(prof) -> float:
        return sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3

    rows = {"forward": [], "backward": [], "optimizer": []}
    for i in range(4):
        torch.cuda.synchronize()
        state = {}

        def fwd(state=state):
            state["loss"] = loss_fn(ids)

        def bwd(state=state):
            state.pop("loss").backward()

        def opt_step():
            opt.step()
            opt.zero_grad(set_to_none=True)

        for name, fn in (("forward", fwd), ("backward", bwd), ("optimizer", opt_step)):
            torch.cuda.synchronize()
            if i == 3:  # the last round under the profiler: its GPU kernel time
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                rows[name].append(("gpu", gpu_ms(prof)))
                continue
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            rows[name].append(("t", 1e3 * host, 1e3 * (time.perf_counter() - t0)))
    print("phase       host enqueue ms   wall ms   GPU kernel ms (profiled)")
    for name, r in rows.items():
        host = statistics.median(x[1] for x in r if x[0] == "t")
        wall = statistics.median(x[2] for x in r if x[0] == "t")
        gpu = [x[1] for x in r if x[0] == "gpu"][0]
        print(f"{name:10s} {host:16.1f} {wall:9.1f} {gpu:15.1f}")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_name: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc = by_name.setdefault(e.name[:100], [0.0, 0])
            acc[0] += e.device_time / 1e3
            acc[1] += 1
    total = sum(v[0] for v in by_name.values())
    print(f"one step: GPU kernel time {total:.1f} ms, {sum(v[1] for v in by_name.values())} kernels")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"  {ms:8.2f} ms {n:5d}x  {name}")


if __name__ == "__main__":
    main()
