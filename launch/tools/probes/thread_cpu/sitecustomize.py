"""Is a training step bound by the host's threads, and are those threads sharing their cores? (probe; see
../README.md)

Put this folder first on PYTHONPATH and set DISTSFT_THREAD_CPU=1: every process reads, at each optimizer step
(torch's global optimizer-step hook, which DeepSpeed's engine also reaches), the CPU time and context
switches of each of its threads from /proc/self/task, and the host's steal and busy time from /proc/stat.
At exit it prints, over the steps after DISTSFT_THREAD_CPU_SKIP (default 2): the wall time per step and,
per busy thread, its CPU ms per step (a thread near the wall time is what bounds the step), its voluntary
and involuntary context switches per step (involuntary ones: another runnable thread took its core) and
the CPUs it ran on; then the host's steal ms per step (another VM took the core) and its busy cores.

    PYTHONPATH=launch/tools/probes/thread_cpu:$PYTHONPATH DISTSFT_THREAD_CPU=1 torchrun ... distsft/train.py ...
"""

import os

if os.environ.get("DISTSFT_THREAD_CPU") == "1":
    import atexit
    import sys
    import time

    _SKIP = int(os.environ.get("DISTSFT_THREAD_CPU_SKIP", "2"))
    _TICK = os.sysconf("SC_CLK_TCK")
    _samples: list = []  # (wall, {tid: (name, cpu_s, vol, invol, cpu)}, (steal_s, busy_s))

    def _threads() -> dict:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
                vol = invol = 0
                with open(f"/proc/self/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            vol = int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol = int(line.split()[1])
            except OSError:  # the thread ended
                continue
            # after the ")": state is fields[0]; utime, stime are stat fields 14, 15; processor is 39
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICK, vol, invol, int(fields[36]))
        return out

    def _host() -> tuple:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (cpu + [0] * 8)[:8]
        return steal / _TICK, (user + nice + system + irq + softirq) / _TICK

    def _after_step(optimizer, args, kwargs) -> None:
        _samples.append((time.perf_counter(), _threads(), _host()))

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_after_step)

    @atexit.register
    def _report() -> None:
        samples = _samples[_SKIP:]
        if len(samples) < 2:
            return
        (w0, t0, h0), (w1, t1, h1) = samples[0], samples[-1]
        n = len(samples) - 1
        wall = (w1 - w0) / n
        rank = os.environ.get("RANK", "0")
        lines = [f"[thread cpu, rank {rank}] {n} steps after {_SKIP}: wall {wall * 1e3:.1f} ms per step",
                 "  thread (tid)                 cpu ms/step  voluntary/step  involuntary/step  cpus"]
        rows = []
        for tid, (name, cpu, vol, invol, _) in t1.items():
            if tid not in t0:
                continue
            d = (cpu - t0[tid][1]) / n
            cpus = sorted({s[1][tid][4] for s in samples if tid in s[1]})
            rows.append((d, f"  {name[:20]:20s} ({tid:>6d}) {d * 1e3:10.1f}  {(vol - t0[tid][2]) / n:14.1f}  "
                            f"{(invol - t0[tid][3]) / n:16.1f}  {','.join(map(str, cpus))}"))
        rows.sort(reverse=True)
        lines += [r for d, r in rows if d > 0.001] or ["  (no thread used over 1 ms per step)"]
        lines.append(f"  host: steal {(h1[0] - h0[0]) / n * 1e3:.1f} ms per step, busy "
                     f"{(h1[1] - h0[1]) / n / wall:.2f} cores of {os.cpu_count()}")
        print("\n".join(lines), file=sys.stderr, flush=True)
