"""Phase 6 of launch/bench_multigpu.py: SIGTERM during an N-GPU run, to the torchrun agent and/or to every
rank; measured from the signal: the checkpoint's commit and the agent's exit; checked: exit code 75 on every
rank, the status file, one committed checkpoint that verifies."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import time
from typing import Any

from .launching import (
    REQUEUE_EXIT_CODE,
    Bench,
    Launch,
    children_map,
    is_rank,
    median,
    printed_exit_codes,
    read_records,
    series,
    timing_events,
)
from .reporting import fmt, table

# ----------------------------------------------------------------------------------------------------
# Phase 6: SIGTERM during an N-GPU run


def phase_sigterm(b: Bench) -> None:
    a = b.args
    n = b.n
    rows, res = [], {"goal_s": a.sigterm_goal_s, "runs": {}}
    for target in a.sigterm_targets:
        name = f"sigterm_{target}_{n}"
        r = sigterm_run(b, name, n, target)
        res["runs"][target] = r
        rows.append([target, n, a.sigterm_mode, r.get("step_s"), r.get("signal_step"), r.get("checkpoint_step"),
                     r.get("to_commit_s"), r.get("to_exit_s"), r.get("trainer_save_s"),
                     ", ".join(map(str, r.get("rank_exit_codes") or [])), r.get("status_file_code"), r.get("agent_rc"),
                     ", ".join(map(str, r.get("torchrun_exit_codes") or [])) or "none printed",
                     r.get("one_verified_checkpoint"), r.get("passed"), r.get("goal_met"), r.get("status")])
    res["passed"] = bool(res["runs"]) and all(r.get("passed") for r in res["runs"].values())
    shape = "tiny 2-layer Llama (CPU)" if b.cpu else (a.sigterm_shape or a.shape)
    md = (f"### 6. SIGTERM during a {n}-GPU run ({shape}, {a.sigterm_mode}, per-GPU batch {a.micro} x {a.seq}, no "
          "periodic checkpoints): seconds from the signal\n\n" + table(
              ["signal to", "GPUs", "mode", "step s", "signal after step", "checkpoint step", "to commit s",
               "to exit s", "trainer save s", "ranks' exit codes", "status file exit_code", "torchrun exit",
               "torchrun's report", "one verified checkpoint", "pass (75, checkpoint)",
               f"exit < {a.sigterm_goal_s:g} s", "status"], rows)
          + "\n\nTo commit: the signal until `checkpoints/step-N` appears (the rank that saw it finishes its "
          "step first: up to one step time); to exit: until the torchrun agent has exited. Ranks' exit codes: "
          "the trainer's own (`SystemExit`, recorded by the `_trainer` wrapper). torchrun exits 1 when any "
          "worker fails, and a rank still tearing down when a peer's 75 reaches the agent is SIGTERMed by it "
          "(-15 in torchrun's report, after the commit): launch/multinode.sh and slurm.sbatch read the "
          "status file for that reason.")
    b.record("sigterm", res, md)


def sigterm_run(b: Bench, name: str, n: int, target: str) -> dict:
    a = b.args
    if name in b.sigterm_results:  # a phase re-rendered after a stop
        return b.sigterm_results[name]
    out = b.work / name
    status_file = b.work / f"{name}.status.json"
    launch = b.launches.setdefault(name, Launch(name, n, a.sigterm_mode, out))
    timeout = b.launch_timeout()
    if timeout is None or launch.started is not None:
        launch.skipped = launch.skipped or (b.skip_reason() if launch.started is None else None)
        return {"status": launch.status()}
    shutil.rmtree(out, ignore_errors=True)
    status_file.unlink(missing_ok=True)
    ov = b.overrides(out, n, a.sigterm_mode, which="sigterm", micro=a.micro, accum=1, steps=100000, seq=a.seq)
    cmd = b.torchrun(n, ov, timed=True)
    launch.commands.append(f"DISTSFT_STATUS_FILE={status_file} " + shlex.join(cmd))
    launch.log = b.work / "logs" / f"{name}.log"
    r: dict[str, Any] = {}
    print(f"[bench] {name}: {n} x {a.sigterm_mode}, SIGTERM to {target} after step {a.sigterm_after} ...", flush=True)
    ckpts = out / "checkpoints"
    with open(launch.log, "w") as logf:
        logf.write("$ " + launch.commands[0] + "\n")
        logf.flush()
        launch.started, t_start = time.time(), time.monotonic()
        agent = b.spawn(cmd, env=b.env(n, {"DISTSFT_STATUS_FILE": str(status_file)}), stdout=logf)
        try:
            deadline = t_start + timeout
            while True:  # wait for --sigterm-after optimizer steps
                steps = series(read_records(out), "train/loss")
                if steps and max(steps) >= a.sigterm_after:
                    break
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("training ended or never reached the signal step")
                time.sleep(0.05)
            ranks = [p for p in children_map().get(agent.pid, []) if is_rank(p)]
            r["signal_step"] = max(steps)
            t_sig = time.monotonic()
            if target == "agent":
                os.kill(agent.pid, signal.SIGTERM)
            else:
                for p in ranks:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGTERM)
            committed = None
            while agent.poll() is None and time.monotonic() < deadline:
                if committed is None and ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
                    committed = time.monotonic() - t_sig
                time.sleep(0.005)
            if agent.poll() is None:
                launch.timed_out = True
                b.reaped(agent)
            r["to_exit_s"] = time.monotonic() - t_sig if not launch.timed_out else None
            if committed is None and ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
                committed = r["to_exit_s"]  # committed between the last poll and the exit
            r["to_commit_s"] = committed
        except RuntimeError as e:
            r["error"] = str(e)
        finally:
            b.reaped(agent)
            launch.rc = agent.returncode
            launch.rcs = [agent.returncode]
            launch.wall_s = time.monotonic() - t_start
    log = launch.log.read_text()
    r["agent_rc"] = launch.rc
    r["torchrun_exit_codes"] = [int(x) for x in printed_exit_codes(log)]
    r["rank_exit_codes"] = [e.get("code") for e in sorted(timing_events(launch, "exit"), key=lambda e: e["rank"])]
    r["step_s"] = median([x.get("perf/step_time_s") for x in read_records(out) if "train/loss" in x])
    saves = [line for line in log.splitlines() if " committed: " in line and "checkpoint " in line]
    if saves:
        with contextlib.suppress(ValueError, IndexError):
            r["trainer_save_s"] = float(saves[-1].rsplit(" in ", 1)[1].rstrip("s"))
    with contextlib.suppress(OSError, json.JSONDecodeError):
        st = json.loads(status_file.read_text())
        r["status_file"] = st
        r["status_file_code"] = st.get("exit_code")
    committed_dirs = sorted(p for p in ckpts.glob("step-*")) if ckpts.is_dir() else []
    r["checkpoint_step"] = int(committed_dirs[-1].name.split("-")[1]) if committed_dirs else None
    verified = False
    if len(committed_dirs) == 1:
        try:
            from distsft.checkpoint import verify

            verify(committed_dirs[0])
            verified = True
        except Exception as e:  # a CheckpointError, or distsft not importable here
            r["verify_error"] = str(e)
    r["one_verified_checkpoint"] = verified
    # Ranks that torchrun prints: 75, or -15 for a rank still tearing down when a peer's 75 reached the
    # agent, which then SIGTERMs the rest (Python has restored the default handler by then). Harmless: every
    # rank leaves the save only after the commit; torchrun itself exits 1 either way, hence the status file.
    printed = r["torchrun_exit_codes"]
    codes_ok = (r.get("status_file_code") == REQUEUE_EXIT_CODE
                and r["rank_exit_codes"] == [REQUEUE_EXIT_CODE] * n
                and all(c in (REQUEUE_EXIT_CODE, -signal.SIGTERM) for c in printed)
                and (not printed or REQUEUE_EXIT_CODE in printed))
    r["passed"] = bool(codes_ok and verified and "error" not in r and r.get("to_exit_s") is not None)
    r["goal_met"] = None if r.get("to_exit_s") is None else r["to_exit_s"] < a.sigterm_goal_s
    r["status"] = launch.status() if launch.timed_out or "error" in r else f"agent exit {launch.rc}"
    # the launch is "ok" for the bench when the trainer did what preemption asks
    b.sigterm_results[name] = r
    launch.error = None if r["passed"] else log[-3000:]
    if not r["passed"]:
        print(f"[bench] {name}: FAILED {r}\n{log[-3000:]}", flush=True)
    else:
        print(f"[bench] {name}: commit after {fmt(r['to_commit_s'])}s, exit after {fmt(r['to_exit_s'])}s", flush=True)
    b.save()
    return r
