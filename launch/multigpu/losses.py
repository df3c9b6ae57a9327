"""Phases 3-5 of launch/bench_multigpu.py, which share their runs: loss parity (1 GPU vs N GPUs DDP vs N GPUs
ZeRO-3, same global batch), the resume chain across world sizes (the N-GPU DDP run of phase 3 is the
uninterrupted one), and two torchrun agents on one host through launch/multinode.sh."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

from . import REPO
from .launching import Bench, GpuMemPoller, Launch, free_port, median, save_info
from .reporting import fmt, loss_fmt, table

# ----------------------------------------------------------------------------------------------------
# Phases 3 and 4: loss parity and the resume chain share their runs


def chain_worlds(n: int) -> list[int]:
    """N/2, N/4, ..., 1 (the worlds the N-GPU checkpoint resumes on in turn), only those dividing N."""
    out, w = [], n // 2
    while w >= 1:
        if n % w == 0 and w not in out:
            out.append(w)
        w //= 2
    if n > 1 and 1 not in out:
        out.append(1)
    return out


def loss_plan(b: Bench) -> dict:
    a, n = b.args, b.n
    worlds = chain_worlds(n)
    k = a.chain_k
    total = k * (len(worlds) + 2)  # the N-GPU segment, one per world, ZeRO-3 on N
    return {"n": n, "k": k, "worlds": worlds, "steps": total, "global_batch": n * a.loss_micro}


def loss_run(b: Bench, world: int, mode: str, name: str, steps: int, *, timed: bool = False,
             extra: dict | None = None, prepare=None) -> Launch:
    a, plan = b.args, loss_plan(b)
    accum = plan["global_batch"] // (a.loss_micro * world)
    ex = {"model.zero_init": "false", **(extra or {})}  # the same weights in every mode
    ov = b.overrides(b.work / name, world, mode, which="loss", micro=a.loss_micro, accum=accum, steps=steps,
                     seq=a.seq, save_steps=plan["k"], extra=ex)
    return b.run(name, world, mode, ov, timed=timed, prepare=prepare)


def compare(ref: Launch, run: Launch, steps) -> dict:
    lr, lo, dr, do = ref.losses(), run.losses(), ref.digests(), run.digests()
    steps = [s for s in steps if s in lr and s in lo]
    diffs = {s: abs(lr[s] - lo[s]) for s in steps}
    return {"steps": steps, "max_abs_diff": max(diffs.values()) if diffs else None,
            "first_step_diff": diffs[steps[0]] if steps else None,
            "same_samples": bool(steps) and all(dr.get(s) == do.get(s) for s in steps),
            "final_loss": lo[steps[-1]] if steps else None}


def phase_parity(b: Bench) -> None:
    a, plan = b.args, loss_plan(b)
    n, steps = plan["n"], plan["steps"]
    runs = [("1 GPU", loss_run(b, 1, "ddp", "loss_single_1", steps)),
            (f"{n} GPUs DDP", loss_run(b, n, "ddp", f"loss_ddp_{n}", steps)),
            (f"{n} GPUs ZeRO-3", loss_run(b, n, "zero3", f"loss_zero3_{n}", steps))]
    ref = runs[0][1]
    rows, res = [], {"global_batch": plan["global_batch"], "steps": steps, "atol": a.atol, "runs": {}}
    for label, run in runs:
        c = compare(ref, run, range(1, steps + 1))
        complete = len(c["steps"]) == steps
        passed = complete and c["same_samples"] and c["max_abs_diff"] is not None and c["max_abs_diff"] <= a.atol
        accum = plan["global_batch"] // (a.loss_micro * run.world)
        res["runs"][label] = {**c, "world": run.world, "mode": run.mode, "accum": accum, "passed": passed,
                              "status": run.status()}
        rows.append([label, f"{a.loss_micro} x {accum}", plan["global_batch"], len(c["steps"]), c["same_samples"],
                     c["first_step_diff"], c["max_abs_diff"], loss_fmt(c["final_loss"]), passed, run.status()])
    res["passed"] = all(r["passed"] for r in res["runs"].values())
    shape = "tiny 2-layer Llama, fp32 (CPU)" if b.cpu else f"{a.loss_shape}, bf16"
    md = (f"### 3. Loss parity on real data ({Path(b.data).name}, {shape}, {a.seq}-token packed slots, constant "
          f"lr {a.lr:g}): per-step loss against the 1-GPU run, same global batch\n\n" + table(
              ["run", "micro x accumulation", "global batch", "steps", "same samples every step",
               "step-1 |diff|", "max |diff| vs 1 GPU", "final loss", f"pass (<= {a.atol:g})", "status"], rows))
    b.record("parity", res, md)


def copy_checkpoint(src: Launch, step: int, dest: Path) -> None:
    target = dest / "checkpoints" / f"step-{step:08d}"
    if target.exists():
        return
    shutil.copytree(src.out / "checkpoints" / f"step-{step:08d}", target)


def load_time(launch: Launch) -> float | None:
    """The trainer's `checkpoint/load_s` (rank 0's `load_checkpoint`: verify, read every shard, reassemble,
    apply) when the launch resumed."""
    loads = [r["checkpoint/load_s"] for r in launch.records() if r.get("checkpoint/load_s") is not None]
    return loads[-1] if loads else None


def phase_resume(b: Bench) -> None:
    a, plan = b.args, loss_plan(b)
    n, k, steps = plan["n"], plan["k"], plan["steps"]
    ref = loss_run(b, n, "ddp", f"loss_ddp_{n}", steps)  # phase 3's: saved every k steps
    segments = [(w, "ddp") for w in plan["worlds"]] + [(n, "zero3")]
    rows, curve_rows, res = [], [], {"k": k, "steps": steps, "atol": a.atol, "segments": []}
    prev, prev_label = ref, f"{n} x DDP"
    for i, (world, mode) in enumerate(segments, start=1):
        start, end = i * k, (i + 1) * k
        name = f"resume_{i}_{mode}_{world}"
        source = prev
        ok_source = source.ok and (source.out / "checkpoints" / f"step-{start:08d}").is_dir()
        if not ok_source:
            launch = Launch(name, world, mode, b.work / name, skipped=f"no step-{start} checkpoint from {source.name}")
            b.launches[name] = launch
        else:
            launch = loss_run(b, world, mode, name, end, timed=True,
                              extra={"checkpoint.resume_from_checkpoint": "auto"},
                              prepare=lambda out, s=source, st=start: copy_checkpoint(s, st, out))
        saved = save_info(source, start)
        save_s, mb = saved["save_s"], saved["mb"]
        load_s = load_time(launch)
        c = compare(ref, launch, range(start + 1, end + 1))
        recs = launch.records()
        resumed = any(r.get("event") == "resumed" for r in recs)
        changed = [r for r in recs if r.get("event") == "world_size_changed"]
        passed = (launch.ok and resumed and len(c["steps"]) == k and c["same_samples"]
                  and c["max_abs_diff"] is not None and c["max_abs_diff"] <= a.atol)
        seg = {"segment": i, "saved_by": prev_label, "step": start, "save_s": save_s,
               "save_wall_s": saved["wall_s"], "checkpoint_mb": mb,
               "resumed_on": f"{world} x {mode}", "load_s": load_s, "resumed": resumed,
               "world_size_changed": [(r["before"], r["after"]) for r in changed], **c, "passed": passed,
               "status": launch.status()}
        res["segments"].append(seg)
        rows.append([i, prev_label, start, save_s, saved["wall_s"], mb, f"{world} x {mode}", load_s,
                     f"{start + 1}-{end}", c["same_samples"], c["max_abs_diff"], passed, launch.status()])
        lr, lo = ref.losses(), launch.losses()
        for s in range(start + 1, end + 1):
            curve_rows.append([s, loss_fmt(lr.get(s)), f"{world} x {mode}", loss_fmt(lo.get(s)),
                               abs(lr[s] - lo[s]) if s in lr and s in lo else None])
        prev, prev_label = launch, f"{world} x {mode}"
    # The last checkpoint's save (written by the final segment) has no loader: record it too.
    last = save_info(prev, steps)
    last_save = (last["save_s"], last["mb"])
    res["final_save_s"], res["final_checkpoint_mb"] = last_save
    res["passed"] = bool(res["segments"]) and all(s["passed"] for s in res["segments"])
    lr = ref.losses()
    curve = [[s, loss_fmt(lr.get(s)), f"{n} x DDP (uninterrupted = the chain's first segment)", loss_fmt(lr.get(s)),
              0.0 if s in lr else None] for s in range(1, k + 1)] + curve_rows
    shape = "tiny 2-layer Llama, fp32 (CPU)" if b.cpu else f"{a.loss_shape}, bf16"
    md = (f"### 4. Resume across world sizes ({shape}, global batch {plan['global_batch']} throughout, "
          f"{k} steps per segment)\n\nEach checkpoint is saved by one world and loaded by the next. save = the "
          "trainer's `checkpoint/save_s` (shards, manifest, commit); incl. adapter export = from the step's metrics "
          "record to the checkpoint's (adds the PEFT adapter export, a gather under ZeRO-3); load = the trainer's "
          "`checkpoint/load_s` (rank 0's `load_checkpoint`: verify, read every shard, reassemble, apply).\n\n"
          + table(
              ["segment", "saved by", "at step", "save s", "save incl. adapter export s", "checkpoint MB",
               "resumed on", "load s",
               "steps compared", "same samples", "max |diff| vs uninterrupted", f"pass (<= {a.atol:g})", "status"],
              rows)
          + f"\n\nFinal checkpoint (step {steps}, by {prev_label}): save {fmt(last_save[0])} s, "
          f"{fmt(last_save[1])} MB.\n\nLoss curve, uninterrupted {n}-GPU DDP run against the chain:\n\n"
          + table(["step", "uninterrupted loss", "chain segment", "chain loss", "|diff|"], curve))
    b.record("resume", res, md)


# ----------------------------------------------------------------------------------------------------
# Phase 5: two agents ("nodes") on one host through launch/multinode.sh


def phase_nodes(b: Bench) -> None:
    a, plan = b.args, loss_plan(b)
    n = b.n - (b.n % 2)
    name = f"nodes_2x{n // 2}"
    if n < 2:
        b.record("nodes", {"skipped": "needs 2 GPUs"}, "### 5. Two agents on one host\n\nskipped: needs >= 2 GPUs")
        return
    per = n // 2
    cached = name in b.launches
    launch = b.launches.setdefault(name, Launch(name, n, "ddp", b.work / name))
    timeout = None if cached else b.launch_timeout()
    steps = plan["steps"]
    accum = plan["global_batch"] // (a.loss_micro * n)
    if plan["global_batch"] % (a.loss_micro * n):
        accum = 1
    ov = b.overrides(launch.out, n, "ddp", which="loss", micro=a.loss_micro, accum=accum, steps=steps, seq=a.seq,
                     save_steps=plan["k"], extra={"model.zero_init": "false"})
    if cached:
        pass
    elif timeout is None:
        launch.skipped = b.skip_reason()
    else:
        shutil.rmtree(launch.out, ignore_errors=True)
        port = free_port()
        procs, logs = [], []
        launch.log = b.work / "logs" / f"{name}.log"
        print(f"[bench] {name}: 2 agents x {per} ...", flush=True)
        with GpuMemPoller(not b.cpu) as poll:
            launch.started, t0 = time.time(), time.monotonic()
            for node in (0, 1):
                extra = {"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "GPUS_PER_NODE": str(per)}
                if not b.cpu:
                    extra["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(node * per, (node + 1) * per))
                cmd = ["bash", str(REPO / "launch" / "multinode.sh"), *ov]
                launch.commands.append(" ".join(f"{k}={v}" for k, v in extra.items()) + " " + shlex.join(cmd))
                log = open(b.work / "logs" / f"{name}.node{node}.log", "w")  # noqa: SIM115
                logs.append(log)
                procs.append(b.spawn(cmd, env=b.env(per, extra), stdout=log))
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    launch.timed_out = True
            for p in procs:
                b.reaped(p)
            launch.wall_s = time.monotonic() - t0
        for log in logs:
            log.close()
        launch.rcs = [p.returncode for p in procs]
        launch.rc = 0 if all(rc == 0 for rc in launch.rcs) else next(rc for rc in launch.rcs if rc != 0)
        launch.gpu_peak_mib = dict(poll.peak)
        launch.log.write_text("".join((b.work / "logs" / f"{name}.node{i}.log").read_text() for i in (0, 1)))
        b._after(launch)
    ref = b.launches.get(f"loss_ddp_{n}")
    c = compare(ref, launch, range(1, steps + 1)) if ref is not None and ref.ok and n == b.n else None
    recs = [r for r in launch.records() if "train/loss" in r and r["step"] > 1]
    tps = median([r.get("perf/input_tokens_per_s_per_gpu") for r in recs])
    ckpt = sorted(p.name for p in (launch.out / "checkpoints").glob("step-*")) if launch.out.is_dir() else []
    passed = launch.ok and len(launch.losses()) == steps and (c is None or (
        c["same_samples"] and c["max_abs_diff"] is not None and c["max_abs_diff"] <= a.atol))
    res = {"agents": 2, "per_agent": per, "rcs": launch.rcs, "steps": len(launch.losses()), "tokens_per_s_per_gpu": tps,
           "vs_single_agent": c, "checkpoints": ckpt, "passed": passed, "status": launch.status(),
           "wall_s": launch.wall_s}
    rows = [[f"2 x {per}", "DDP", ", ".join(str(r) for r in launch.rcs), len(launch.losses()), tps,
             None if c is None else c["same_samples"], None if c is None else c["max_abs_diff"],
             ", ".join(ckpt), passed, launch.wall_s, launch.status()]]
    md = ("### 5. Two torchrun agents on one host (launch/multinode.sh, NNODES=2, MASTER_ADDR=127.0.0.1), "
          "phase 3's configuration\n\n" + table(
              ["agents x processes", "mode", "exit codes", "steps", "input tokens/s per GPU",
               "same samples as 1 agent", "max |diff| vs 1 agent", "checkpoints", "pass", "wall s", "status"], rows))
    b.record("nodes", res, md)
