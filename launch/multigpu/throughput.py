"""Phases 1 and 2 of launch/bench_multigpu.py: weak scaling (DDP, ZeRO-2) at a constant per-GPU batch, and
ZeRO-3 with the big shape initialised partitioned. Both read the trainer's own per-step metrics."""

from __future__ import annotations

from .launching import Bench, median, save_info
from .reporting import pct, table

# ----------------------------------------------------------------------------------------------------
# Phase 1: weak scaling


def phase_scaling(b: Bench) -> None:
    a = b.args
    rows, res = [], {}
    for mode in a.modes:
        base = None
        for n in b.gpus:
            name = f"scaling_{mode}_{n}"
            steps = a.warmup + a.steps
            ov = b.overrides(b.work / name, n, mode, which="shape", micro=a.micro, accum=1, steps=steps, seq=a.seq)
            launch = b.run(name, n, mode, ov)
            recs = [r for r in launch.records() if "train/loss" in r and r["step"] > a.warmup]
            tps = median([r.get("perf/input_tokens_per_s_per_gpu") for r in recs])
            step_s = median([r.get("perf/step_time_s") for r in recs])
            mfu = median([r.get("perf/mfu") for r in recs])
            peak = max([r["mem/peak_allocated_gib"] for r in recs if r.get("mem/peak_allocated_gib")], default=None)
            smi = max(launch.gpu_peak_mib.values()) / 1024 if launch.gpu_peak_mib else None
            entry = {"gpus": n, "mode": mode, "tokens_per_s_per_gpu": tps, "step_time_s": step_s, "mfu": mfu,
                     "peak_allocated_gib_rank0": peak, "peak_used_gib_max_gpu": smi, "measured_steps": len(recs),
                     "startup_s": launch.startup_s(), "wall_s": launch.wall_s, "status": launch.status()}
            if n == 1 and tps:
                base = entry
            if base and tps and step_s:
                entry["efficiency"] = tps / base["tokens_per_s_per_gpu"]
                entry["efficiency_step_time"] = base["step_time_s"] / step_s
            res[f"{mode}_{n}"] = entry
            rows.append([mode, n, f"{a.micro} x {a.seq}", tps, step_s, pct(entry.get("efficiency")),
                         pct(entry.get("efficiency_step_time")), pct(mfu), peak, smi, len(recs),
                         launch.startup_s(), launch.wall_s, launch.status()])
    goal = []
    for mode in a.modes:
        top = res.get(f"{mode}_{b.n}", {})
        if b.n > 1 and top.get("efficiency") is not None:
            met = top["efficiency"] >= 0.95
            res[f"goal_{mode}"] = {"gpus": b.n, "efficiency": top["efficiency"], "met": met}
            goal.append(f"{mode} at {b.n} GPUs {pct(top['efficiency'])}: {'met' if met else 'not met'}")
    shape = "tiny 2-layer Llama (CPU)" if b.cpu else a.shape
    footer = f"\n\nGoal, >= 95% efficiency at the largest world: {'; '.join(goal)}." if goal else ""
    md = (f"### 1. Weak scaling: {shape}, LoRA, constant per-GPU batch, median of steps {a.warmup + 1}-"
          f"{a.warmup + a.steps}\n\n" + table(
              ["mode", "GPUs", "per-GPU batch", "input tokens/s per GPU", "step s", "scaling efficiency",
               "efficiency (step time)", "MFU", "peak alloc GiB (rank 0)", "peak used GiB (max GPU)", "steps",
               "first step after s", "wall s", "status"], rows) + footer)
    b.record("scaling", res, md)


# ----------------------------------------------------------------------------------------------------
# Phase 2: ZeRO-3, big shape, partitioned init


def phase_zero3(b: Bench) -> None:
    a = b.args
    n, steps = b.n, a.big_warmup + a.big_steps
    name = f"zero3_big_{n}"
    ov = b.overrides(b.work / name, n, "zero3", which="big", micro=a.big_micro, accum=1, steps=steps, seq=a.seq,
                     save_steps=steps, extra={"model.zero_init": "true", "model.gradient_checkpointing": a.big_gc})
    launch = b.run(name, n, "zero3", ov)
    recs = launch.records()
    train = [r for r in recs if "train/loss" in r and r["step"] > a.big_warmup]
    tps = median([r.get("perf/input_tokens_per_s") for r in train])
    tps_gpu = median([r.get("perf/input_tokens_per_s_per_gpu") for r in train])
    mfu = median([r.get("perf/mfu") for r in train])
    tflops = median([r.get("perf/tflops_per_gpu") for r in train])
    peak = max([r["mem/peak_allocated_gib"] for r in train if r.get("mem/peak_allocated_gib")], default=None)
    saved = save_info(launch, steps)
    save_s, save_mb, save_wall = saved["save_s"], saved["mb"], saved["wall_s"]
    per_gpu = {i: round(v / 1024, 1) for i, v in sorted(launch.gpu_peak_mib.items())}
    res = {"shape": "builtin:tiny-llama" if b.cpu else a.big_shape, "gpus": n, "tokens_per_s": tps,
           "tokens_per_s_per_gpu": tps_gpu, "mfu": mfu, "tflops_per_gpu": tflops, "peak_allocated_gib_rank0": peak,
           "peak_used_gib_per_gpu": per_gpu, "checkpoint_save_s": save_s, "checkpoint_mb": save_mb,
           "checkpoint_save_wall_s": save_wall,
           "save_goal_met": None if save_wall is None else save_wall < 5.0, "startup_s": launch.startup_s(),
           "wall_s": launch.wall_s, "status": launch.status(), "measured_steps": len(train)}
    shape = "demo 4-layer Llama (CPU)" if b.cpu else a.big_shape
    rows = [[shape, n, f"{a.big_micro} x {a.seq}", str(a.big_gc), tps, tps_gpu, pct(mfu), tflops, peak,
             ", ".join(f"{v:g}" for v in per_gpu.values()), save_s, save_wall, save_mb, res["save_goal_met"],
             launch.startup_s(), launch.wall_s, launch.status()]]
    md = (f"### 2. ZeRO-3, {shape}, random weights initialised partitioned (model.zero_init=true), "
          f"median of steps {a.big_warmup + 1}-{steps}\n\n" + table(
              ["shape", "GPUs", "per-GPU batch", "recompute", "input tokens/s", "per GPU",
               "MFU (recomputation not counted)", "TFLOP/s per GPU",
               "peak alloc GiB (rank 0)", "peak used GiB per GPU (nvidia-smi)", "LoRA checkpoint save s",
               "save incl. adapter export s", "checkpoint MB", "save < 5 s", "first step after s", "wall s",
               "status"], rows))
    b.record("zero3", res, md)
