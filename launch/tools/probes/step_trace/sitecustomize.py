"""What holds a training step back on the GPU, inside the trainer as it runs (probe; see ../README.md).

Put this folder first on PYTHONPATH and set DISTSFT_STEP_TRACE=1: after DISTSFT_STEP_TRACE_SKIP optimizer
steps (default 3) every process traces the next DISTSFT_STEP_TRACE_STEPS (default 2) with torch.profiler
(host and GPU) and CUDA's sync-debug mode on, and prints at exit, per traced step:

- the host-device synchronisations, grouped by the Python stack that asked for them (sync-debug warnings);
- the CUDA runtime calls by host time (a long cudaStreamSynchronize / cudaEventSynchronize / cudaHostAlloc
  is a stall);
- how much of the step's wall time some GPU stream was busy, and the longest stretches where none was,
  with the kernels on either side.

Steps are counted by torch's global optimizer-step hook, which DeepSpeed's engine also reaches (it steps the
client optimizer). With DISTSFT_STEP_TRACE_DIR the chrome trace of rank 0 is written there (gzip).

    PYTHONPATH=launch/tools/probes/step_trace:$PYTHONPATH DISTSFT_STEP_TRACE=1 torchrun ... distsft/train.py ...
"""

import os

if os.environ.get("DISTSFT_STEP_TRACE") == "1":
    import atexit
    import collections
    import gzip
    import json
    import sys
    import tempfile
    import time
    import traceback
    import warnings

    _SKIP = int(os.environ.get("DISTSFT_STEP_TRACE_SKIP", "3"))
    _STEPS = int(os.environ.get("DISTSFT_STEP_TRACE_STEPS", "2"))
    _state = {"n": 0, "prof": None, "t0": None, "wall": None, "trace": None}
    _syncs: collections.Counter = collections.Counter()
    _HERE = os.path.dirname(os.path.abspath(__file__))

    def _on_warning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchronizing" not in text and "sync" not in text.lower():
            return _show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(_HERE)
                  and "/warnings.py" not in f.filename]
        keep = [f for f in frames if "/torch/" not in f.filename or f is frames[-1]][-6:]
        def where(f):
            name = os.path.relpath(f.filename) if f.filename.startswith(os.getcwd()) else f.filename
            return f"      {name.split('site-packages/')[-1]}:{f.lineno} {f.name}"

        key = text.split("\n")[0][:90] + "\n" + "\n".join(where(f) for f in keep)
        _syncs[key] += 1

    _show = warnings.showwarning

    def _start():
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        _state["prof"] = torch.profiler.profile(activities=activities)
        _state["prof"].__enter__()
        warnings.showwarning = _on_warning
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        _state["t0"] = time.perf_counter()

    def _stop():
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        _state["wall"] = time.perf_counter() - _state["t0"]
        warnings.showwarning = _show
        prof, _state["prof"] = _state["prof"], None
        prof.__exit__(None, None, None)
        path = os.path.join(tempfile.mkdtemp(prefix="step_trace_"), "trace.json")
        prof.export_chrome_trace(path)
        _state["trace"] = path

    def _after_step(optimizer, args, kwargs):
        _state["n"] += 1
        if _state["n"] == _SKIP:
            _start()
        elif _state["n"] == _SKIP + _STEPS and _state["prof"] is not None:
            _stop()

    # The trainer imports torch anyway; the step hook needs it loaded before any optimizer steps.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_after_step)

    def _merged(intervals):
        out = []
        for start, end in sorted(intervals):
            if out and start <= out[-1][1]:
                out[-1][1] = max(out[-1][1], end)
            else:
                out.append([start, end])
        return out

    @atexit.register
    def _report() -> None:
        if _state["trace"] is None:
            return
        rank = os.environ.get("RANK", "0")
        with open(_state["trace"]) as f:
            events = json.load(f)["traceEvents"]
        steps = _STEPS
        lines = [f"[step trace, rank {rank}] {steps} steps after {_SKIP}; wall {1000 * _state['wall'] / steps:.1f} "
                 "ms per step (profiler on)"]
        kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
        if kernels:
            busy = _merged([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
            first, last = busy[0][0], busy[-1][1]
            busy_us = sum(b - a for a, b in busy)
            lines.append(f"  GPU busy {busy_us / 1000 / steps:.1f} ms per step of {(last - first) / 1000 / steps:.1f} "
                         f"ms from the first to the last kernel ({100 * busy_us / max(last - first, 1):.0f}%)")
            by_start = sorted(kernels, key=lambda e: e["ts"])
            gaps = sorted(((busy[i + 1][0] - busy[i][1], busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)),
                          reverse=True)
            idle = sum(g for g, _, _ in gaps)
            lines.append(f"  GPU idle {idle / 1000 / steps:.1f} ms per step; over 100 us: "
                         f"{sum(g for g, _, _ in gaps if g > 100) / 1000 / steps:.1f} ms in "
                         f"{sum(1 for g, _, _ in gaps if g > 100) / steps:.0f} gaps per step; the longest:")
            starts = [e["ts"] for e in by_start]
            import bisect

            for g, a, b in gaps[:12]:
                i = bisect.bisect_left(starts, b)
                before = max((e for e in by_start[max(0, i - 50):i] if e["ts"] + e["dur"] <= a + 1),
                             key=lambda e: e["ts"] + e["dur"], default=None)
                after = by_start[i] if i < len(by_start) else None
                calls = collections.Counter(e["name"] for e in runtime if e["ts"] < b and e["ts"] + e["dur"] > a
                                            and e["dur"] > 0.5 * g)
                lines.append(f"    {g / 1000:7.2f} ms  after {(before or {}).get('name', '?')[:50]!r} before "
                             f"{(after or {}).get('name', '?')[:50]!r}" + (f"; host in {dict(calls)}" if calls else ""))
        per_call = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for e in runtime:
            entry = per_call[e["name"]]
            entry[0] += 1
            entry[1] += e["dur"]
            entry[2] = max(entry[2], e["dur"])
        lines.append("  CUDA runtime calls, host ms per step (calls per step, longest ms):")
        for name, (n, total, longest) in sorted(per_call.items(), key=lambda kv: -kv[1][1])[:14]:
            lines.append(f"    {total / 1000 / steps:8.2f} ms {n / steps:8.1f}  {longest / 1000:7.2f}  {name}")
        lines.append(f"  host-device synchronisations (sync-debug mode): {sum(_syncs.values()) / steps:.1f} per step")
        for key, n in _syncs.most_common(10):
            lines.append(f"    {n / steps:6.1f} per step  {key}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        out = os.environ.get("DISTSFT_STEP_TRACE_DIR")
        if out and rank == "0":
            os.makedirs(out, exist_ok=True)
            with open(_state["trace"], "rb") as src, gzip.open(os.path.join(out, f"trace_{os.getpid()}.json.gz"),
                                                               "wb") as dst:
                dst.write(src.read())
