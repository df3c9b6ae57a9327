"""Where a training step's host (CPU) time goes, on the GPU machine: the same model as launch/bench_e2e.py,
one step under cProfile (top functions by own time and by cumulative time), the host time to enqueue a
step against the step's wall time, and any host-device synchronisation inside the step
(torch.cuda.set_sync_debug_mode). `--phases` adds, for the forward, the backward and the optimizer step each
started on an idle GPU: the host's time to enqueue the phase, the phase's wall time, and the GPU's kernel time
in it (torch.profiler), so a phase the host holds back (wall close to its host time, GPU time well below)
shows apart from one the GPU holds back; the kernels with the most GPU time in a step; and where in the
step the compute stream sits idle (the longest gaps, the kernels around them, and whether a copy on another
stream ended in the gap). `--memory` replays the allocator's trace of one step: what is allocated at its
peak, by call site. `--ops` lists, per phase, the operators the host dispatched (torch.profiler's CPU
events: count and own host time), the place to look when a phase is host-bound.

    python launch/tools/profile_host.py --qlora --gc --offload --case llama3-8b:2x2048 --phases --memory
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launch/: bench_e2e


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
    ap.add_argument("--memory", action="store_true", help="what is allocated at the step's peak, by call site")
    ap.add_argument("--ops", action="store_true", help="operators dispatched per phase: count, own host time")
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
    if args.memory:
        memory_at_peak(step)
    if args.ops:
        host_ops(loss_fn, ids, opt, args.top)
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


def memory_at_peak(step, top: int = 25) -> None:
    """Replay the allocator's trace of one step: the allocated bytes at the step's peak, split into what was
    allocated before the step (weights, optimizer state, ...) and the step's own live allocations, grouped
    by the innermost call site in the repository (else the innermost Python frame)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    repo = str(Path(__file__).resolve().parents[2])

    def site(frames) -> str:
        py = [f for f in frames if f["filename"].endswith(".py")]
        ours = [f for f in py if f["filename"].startswith(repo) or "distsft_kernels" in f["filename"]]
        f = (ours or py or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
        return f"{Path(f['filename']).name}:{f['line']} {f['name']}"

    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], site(ev.get("frames", [])))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    gib = 2 ** 30
    print(f"memory: allocated before the step {before / gib:.3f} GiB; step peak "
          f"{torch.cuda.max_memory_allocated() / gib:.3f}"
          f" GiB (trace: {(before + peak) / gib:.3f}); the step's own allocations live at the peak, by site:")
    by_site: dict[str, list] = {}
    for size, where in at_peak.values():
        acc = by_site.setdefault(where, [0, 0])
        acc[0] += size
        acc[1] += 1
    for where, (size, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {size / 2 ** 20:9.1f} MiB {n:5d}x  {where}")


def host_ops(loss_fn, ids, opt, top: int) -> None:
    """The operators the host dispatches in the forward and in the backward of one step (aten ops, Triton and
    Python-level autograd functions as the CPU profiler records them): how many, and their own host time
    (inflated by the profiler's per-event cost, so read the counts and the ranking, not the absolute times)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    state = {}
    for name, fn in (("forward", lambda: state.update(loss=loss_fn(ids))),
                     ("backward", lambda: state.pop("loss").backward())):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        torch.cuda.synchronize()
        avg = prof.key_averages()
        n = sum(e.count for e in avg)
        own = sum(e.self_cpu_time_total for e in avg) / 1e3
        print(f"{name}: {n} host events, own host time {own:.1f} ms (profiled); top {top} by own time:")
        for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"  {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:90]}")
        # every launch (kernel, memset, copy) by the outermost aten op it came from, under the nearest
        # Python-level autograd Function or checkpoint: which ops cost the most launches
        by_op: dict[str, int] = {}
        for e in prof.events():
            if not e.name.startswith(("cudaLaunch", "cuLaunch", "cudaMemsetAsync", "cudaMemcpyAsync")):
                continue
            op, owner, p = None, "-", e.cpu_parent
            while p is not None:
                if p.name.startswith("aten::"):
                    op = p.name
                elif owner == "-":
                    owner = p.name
                p = p.cpu_parent
            kind = "memset" if "Memset" in e.name else "memcpy" if "Memcpy" in e.name else "kernel"
            key = f"{op or '(Triton or direct)'} [{kind}] in {owner}"
            by_op[key] = by_op.get(key, 0) + 1
        print(f"{name}: {sum(by_op.values())} launches, by issuing op:")
        for key, n in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {n:6d}x  {key[:110]}")
    opt.step()
    opt.zero_grad(set_to_none=True)


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
    idle_gaps(prof)


def idle_gaps(prof, top: int = 25) -> None:
    """Where the compute stream (the one with the most kernel time) sits idle inside the step: total idle,
    idle per tenth of the step, and the longest gaps with the kernels around them and whether a copy on
    another stream ended just before the gap did (the stream waited for it) or not (the host was late)."""
    events = [(e.device_resource_id(), e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
              for e in prof.profiler.kineto_results.events() if e.device_type().name == "CUDA"]
    busy: dict[int, int] = {}
    for stream, t0, t1, _ in events:
        busy[stream] = busy.get(stream, 0) + t1 - t0
    main = max(busy, key=busy.get)
    ks = sorted(e for e in events if e[0] == main)
    others = sorted((t1, name) for stream, _, t1, name in events if stream != main)
    start, end = ks[0][1], ks[-1][2]
    gaps = [(b[1] - a[2], a, b) for a, b in itertools.pairwise(ks) if b[1] > a[2]]
    idle = sum(g for g, _, _ in gaps)
    print(f"compute stream {main}: {len(ks)} kernels over {(end - start) / 1e6:.1f} ms, idle {idle / 1e6:.1f} ms "
          f"in {len(gaps)} gaps ({sum(g for g, _, _ in gaps if g > 20_000) / 1e6:.1f} ms in gaps > 20 us); "
          f"other streams busy {sum(v for k, v in busy.items() if k != main) / 1e6:.1f} ms")
    tenth = (end - start) / 10
    per = [0.0] * 10
    for g, a, _ in gaps:
        per[min(9, int((a[2] - start) / tenth))] += g / 1e6
    print("idle ms per tenth of the step: " + " ".join(f"{v:.1f}" for v in per))
    import bisect

    print(f"longest {top} gaps: at ms, gap us, kernel before -> after, copy on another stream ending in the gap")
    for g, a, b in sorted(gaps, key=lambda t: -t[0])[:top]:
        i = bisect.bisect_right(others, (b[1],)) - 1
        waited = others[i][1][:30] if i >= 0 and others[i][0] >= a[2] else "-"
        print(f"  {(a[2] - start) / 1e6:7.2f} {g / 1e3:8.1f}  {a[3][:45]} -> {b[3][:45]}  [{waited}]")


if __name__ == "__main__":
    main()
