"""Multi-GPU benchmark set of issue 8: scaling, ZeRO-3 at 70B, loss parity, resume across world sizes,
two agents on one host, SIGTERM at scale. Every number comes from real `distsft/train.py` launches.
The code is in launch/multigpu/ (phases, launching, reporting); this file is its command line.

    python launch/bench_multigpu.py all --out /tmp/mg.md                 # every phase, GPUs 1,2,4,8
    python launch/bench_multigpu.py scaling --modes ddp --out /tmp/a.md   # one phase (or several)
    python launch/bench_multigpu.py all --cpu --gpus 1,2 --out /tmp/c.md  # the same code paths on CPU
    python launch/bench_multigpu.py report a.json b.json --out launch/results/multigpu_h200x8.md

Phases (names or numbers; `all` = 1-6, run in this order: scaling, zero3, parity, resume, nodes, sigterm):

  1 scaling  weak scaling: for N in --gpus and each of --modes (ddp, zero2), a constant per-GPU batch
             (--micro x --seq) of the --shape model, --warmup + --steps optimizer steps. Tokens/s per GPU
             is the median of `perf/input_tokens_per_s_per_gpu` over the steps after the warm-up (the
             trainer's metrics.jsonl, one record per step); efficiency = that / the N=1 value of the mode
             (also given from the median step time, which does not depend on packing fill).
  2 zero3    ZeRO-3 with the --big-shape model (llama3-70b) built partitioned (model.zero_init=true), on
             all N GPUs: tokens/s, MFU, peak allocated memory (rank 0, the trainer's) and the peak memory
             in use on every GPU (nvidia-smi, polled); the LoRA checkpoint saved at the last step: seconds
             and size (goal: < 5 s).
  3 parity   loss parity on real data (--data): 1 GPU vs N GPUs DDP vs N GPUs ZeRO-3 with the same global
             batch G = N x micro (gradient_accumulation_steps = G / (micro x world)), same weights (the
             same saved random init everywhere, model.zero_init=false), constant learning rate. Per-step
             `train/loss` and `data/last_step_digest` (the samples of the step) against the 1-GPU run:
             max |diff| and pass/fail at --atol.
  4 resume   the N-GPU DDP run of phase 3 is the uninterrupted run and saves every k steps; its step-k
             checkpoint resumes on N/2 GPUs for k steps, whose checkpoint resumes on N/4, ... 1, then
             ZeRO-3 on N, global batch constant throughout (accumulation adjusted; no
             allow_global_batch_change). Per resume: the losses after it against the uninterrupted run,
             time to save the checkpoint (`checkpoint/save_s`, committed, on the world that wrote it) and
             to load it (`checkpoint/load_s`, rank 0's `load_checkpoint`), the loss curve side by side.
  5 nodes    two torchrun agents of N/2 processes each through launch/multinode.sh (NNODES=2, one host,
             MASTER_ADDR=127.0.0.1, each agent its own CUDA_VISIBLE_DEVICES half), the phase-3 config;
             losses against the single-agent N-GPU run when phase 3 ran in the same call.
  6 sigterm  an N-GPU DDP run of the --sigterm-shape model (default --shape), no periodic checkpoints; after
             --sigterm-after steps SIGTERM goes to the torchrun agent (`agent`, which forwards it and gives
             the workers 30 s) and/or to every rank (`ranks`, as Slurm does) (--sigterm-targets). Measured
             from the signal: the checkpoint directory's commit (its rename, polled every 5 ms) and the
             agent's exit; checked: exit code 75 (every rank's own, recorded by the `_trainer` entry; the
             status file of DISTSFT_STATUS_FILE; what torchrun prints), one committed checkpoint that
             verifies. Goal: < 10 s to exit.

GPU runs: bf16, the trainer's defaults (kernels, varlen attention), `model.tokenizer=builtin:tiny-llama`,
random weights of the shapes in launch/shapes/ (speed does not depend on them). Unless --no-prebuild, each
model of phases 1, 3-6 is drawn once on GPU 0 (a subprocess), saved, and every launch loads it with
`model.name_or_path` (random init on the CPU costs ~100 s per launch at 8B; loading takes seconds);
the 70B of phase 2 is built by the trainer itself under deepspeed.zero.Init (`model.init_from_config`).
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set here and in every
child. --cpu: DS_ACCELERATOR=cpu, gloo, a 2-layer Llama (the test suite's tiny model) and the demo's
4-layer one for phase 2, fp32, eager attention, torch kernels, 1..3 processes: what CI runs
(tests/integration/test_bench_multigpu.py).

On a GPU host with few minutes per call, split the set over three calls with the same --workdir (a call
that finds the previous one's work directory reuses the drawn models and the data cache), each with
`--data FILE --deadline-s SECONDS` and its own `--out NAME.md --logs NAME-logs.tar.gz`:

    python launch/bench_multigpu.py scaling ...                # 8 launches of the 8B shape
    python launch/bench_multigpu.py parity resume nodes ...    # 8 launches of the 1B shape
    python launch/bench_multigpu.py zero3 sigterm ...          # the 70B, then 2 launches of the 8B shape

then `python launch/bench_multigpu.py report scaling.json parity.json zero3.json --out FILE.md`. A call that
ran out of time says which launches it skipped: run those phases (or `scaling --modes zero2`) again in
another call. --commit names the commit to record where the host's copy of .git is stale.

Output: each phase prints its markdown table when it ends; --out FILE.md gets every table plus provenance
(GPU, driver, versions, commit, date, every exact command) and FILE.json the raw numbers, both rewritten
after every launch, so a call killed at its time limit still leaves what it measured. --deadline-s stops
starting launches that would not finish in time. `report` merges the JSON of several calls into one file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from multigpu import NO_MULTICAST, PHASES
from multigpu.launching import DEFAULT_DATA, Bench, kill_tree, prebuild_entry, trainer_entry
from multigpu.losses import phase_nodes, phase_parity, phase_resume
from multigpu.reporting import render, report
from multigpu.sigterm import phase_sigterm
from multigpu.throughput import phase_scaling, phase_zero3

# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("phases", nargs="+", help="all, or some of: " + ", ".join(
        f"{i} {p}" for i, p in enumerate(PHASES, 1)))
    ap.add_argument("--cpu", action="store_true", help="CPU processes (gloo, DS_ACCELERATOR=cpu), tiny models")
    ap.add_argument("--gpus", default=None, help="world sizes for phase 1; the largest is N for the others "
                    "(default 1,2,4,8 capped at the visible GPUs; --cpu: 1,2)")
    ap.add_argument("--modes", default="ddp,zero2", help="phase 1 modes (ddp, zero2, zero3)")
    ap.add_argument("--out", help="markdown file (FILE.json beside it gets the raw numbers)")
    ap.add_argument("--workdir", help="runs, logs, models, data cache (default /tmp/distsft-bench-<time>)")
    ap.add_argument("--data", help=f"real SFT data for every phase (default {DEFAULT_DATA}; the embedded demo "
                    "rows when missing)")
    ap.add_argument("--data-rows", type=int, help="use only the first N rows of --data (faster tokenisation)")
    ap.add_argument("--shape", default="llama3-8b", help="phases 1 and 6 (a launch/shapes name or a config dir)")
    ap.add_argument("--big-shape", default="llama3-70b", help="phase 2")
    ap.add_argument("--loss-shape", default="llama3-1b", help="phases 3-5")
    ap.add_argument("--seq", type=int, help="packed slot length (default 2048; --cpu 256)")
    ap.add_argument("--micro", type=int, help="per-GPU batch of phases 1 and 6 (default 2; --cpu 1)")
    ap.add_argument("--warmup", type=int, help="phase 1 steps not measured (default 3; --cpu 1)")
    ap.add_argument("--steps", type=int, help="phase 1 measured steps (default 10; --cpu 3)")
    ap.add_argument("--big-micro", type=int, default=1)
    ap.add_argument("--big-gc", default=None, help="phase 2 model.gradient_checkpointing (default true; --cpu false)")
    ap.add_argument("--big-warmup", type=int, help="default 2; --cpu 1")
    ap.add_argument("--big-steps", type=int, help="default 4; --cpu 2")
    ap.add_argument("--loss-micro", type=int, default=1, help="phases 3-5 per-GPU micro-batch")
    ap.add_argument("--chain-k", type=int, help="phases 3-5: steps per resume segment (default 4; --cpu 2)")
    ap.add_argument("--lr", type=float, default=1e-3, help="constant learning rate (every phase)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--atol", type=float, help="loss agreement for parity/resume (default 2e-2 bf16; --cpu 2e-5 fp32)")
    ap.add_argument("--sigterm-targets", default="agent,ranks", help="agent (torchrun) and/or ranks (every worker)")
    ap.add_argument("--sigterm-mode", default="ddp", choices=["ddp", "zero2", "zero3"])
    ap.add_argument("--sigterm-after", type=int, help="signal once this many steps are logged (default 3; --cpu 2)")
    ap.add_argument("--sigterm-goal-s", type=float, default=10.0)
    ap.add_argument("--sigterm-shape", help="phase 6 model (default: --shape)")
    ap.add_argument("--prebuild", action=argparse.BooleanOptionalAction, default=True,
                    help="draw each random model once and load it in every launch (default on)")
    ap.add_argument("--deadline-s", type=float, help="start no launch that cannot finish before this many seconds "
                    "from the start (a device call's limit, less margin)")
    ap.add_argument("--min-launch-s", type=float, help="time a launch needs at least (default 120; --cpu 20)")
    ap.add_argument("--launch-timeout-s", type=float, default=900.0)
    ap.add_argument("--commit", help="the commit to record (the device's copy of .git may be stale)")
    ap.add_argument("--logs", help="also write every launch log and metrics.jsonl to this .tar.gz")
    args = ap.parse_args(argv)
    names = []
    for p in args.phases:
        for q in p.split(","):
            if q == "all":
                names += PHASES
            elif q.isdigit() and 1 <= int(q) <= len(PHASES):
                names.append(PHASES[int(q) - 1])
            elif q in PHASES:
                names.append(q)
            else:
                ap.error(f"unknown phase {q!r}")
    args.phases = [p for p in PHASES if p in names]
    cpu = args.cpu
    defaults = dict(seq=(256, 2048), micro=(1, 2), warmup=(1, 3), steps=(3, 10), big_gc=("false", "true"),
                    big_warmup=(1, 2), big_steps=(2, 4), chain_k=(2, 4), atol=(2e-5, 2e-2), sigterm_after=(2, 3),
                    min_launch_s=(20.0, 120.0))
    for k, (c, g) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, c if cpu else g)
    args.gpus = [int(x) for x in (args.gpus or ("1,2" if cpu else "1,2,4,8")).split(",") if x.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in ("ddp", "zero2", "zero3"):
            ap.error(f"--modes: {m!r} is not ddp, zero2 or zero3")
    args.sigterm_targets = [t.strip() for t in args.sigterm_targets.split(",") if t.strip()]
    for t in args.sigterm_targets:
        if t not in ("agent", "ranks"):
            ap.error(f"--sigterm-targets: {t!r} is not agent or ranks")
    return args


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_trainer":
        trainer_entry(argv[1:])
        return 0
    if argv and argv[0] == "_prebuild":
        prebuild_entry(argv[1], argv[2], argv[3], int(argv[4]), argv[5])
        return 0
    if argv and argv[0] == "report":
        ap = argparse.ArgumentParser(prog="bench_multigpu.py report")
        ap.add_argument("files", nargs="+")
        ap.add_argument("--out")
        r = ap.parse_args(argv[1:])
        report(r.files, r.out)
        return 0
    args = parse_args(argv)
    os.environ.update(NO_MULTICAST)  # this process too (it may touch CUDA for the provenance)
    bench = Bench(args)
    print(f"[bench] {bench.report.provenance['device']}, world sizes {bench.gpus}, phases {', '.join(args.phases)}; "
          f"work in {bench.work}", flush=True)
    def stop(signum, frame):  # e.g. the device call's time limit: leave no worker holding a GPU
        if Bench.stopping:
            return
        Bench.stopping = True
        for proc in list(Bench.live):
            kill_tree(proc.pid)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    funcs = {"scaling": phase_scaling, "zero3": phase_zero3, "parity": phase_parity, "resume": phase_resume,
             "nodes": phase_nodes, "sigterm": phase_sigterm}
    failed = []
    try:
        for phase in args.phases:
            try:
                funcs[phase](bench)
            except Exception as e:  # one phase's bug must not lose the others' numbers
                import traceback

                traceback.print_exc()
                bench.notes.append(f"phase {phase} raised {type(e).__name__}: {e}")
                failed.append(phase)
            except SystemExit:  # stopped: the phase's table from what it finished (the rest is skipped)
                bench.notes.append(f"stopped by a signal during phase {phase}")
                with contextlib.suppress(Exception):
                    funcs[phase](bench)
                raise
    finally:
        bench.save()
        if args.logs:
            import tarfile

            with tarfile.open(args.logs, "w:gz") as tar:
                tar.add(bench.work / "logs", arcname="logs")
                for m in bench.work.glob("*/metrics.jsonl"):
                    tar.add(m, arcname=f"metrics/{m.parent.name}.jsonl")
    print("\n" + render(bench.payload()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
