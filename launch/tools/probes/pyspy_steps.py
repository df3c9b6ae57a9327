"""Per-thread host time of the trainer's training loop from a py-spy raw profile (probe; see README.md).

    py-spy record -r 100 --subprocesses --idle --threads -f raw -o spy.txt -- python3 launch/bench_zero.py ...
    python launch/tools/probes/pyspy_steps.py spy.txt --steps 10 [--rate 100] [--match deepspeed,zero3_host]

For each trainer process (the `distsft/train.py` worker, not its torchrun launcher; the mode is read from
its command line), and each of its threads that ran the loop's Python (the main thread: forward, step;
the autograd thread: backward hooks, recomputation), prints milliseconds per step of the heaviest
frames, inclusive and self. The main thread counts only stacks under the loop's forward, backward or
step; unnamed threads (the autograd engine's) count every stack with Python frames; named ones are
skipped. `--steps` is the number of optimizer steps the process ran (warm-up included: the profile has
no timestamps), so the figures are an average over the whole run. `--match` keeps frames whose text
contains one of the given words (e.g. DeepSpeed's and distsft's ZeRO-3 code).
"""

import argparse
import collections
import re

LOOP = ("StepBackend.backward", "StepBackend.clip_and_step", "CausalLMWithLoss.forward")


def mode_of(cmd: str) -> str:
    base = next((n for n in ("zero3", "zero2", "zero1") if f"{n}.json" in cmd), "none")
    variants = [v for k, v in (("load_in_4bit=true", "qlora"), ("offload_checkpoints=true", "lean"),
                               ("gradient_checkpointing=true", "gc")) if k in cmd]
    if "lean" in variants:
        variants.remove("gc")
    return "+".join([base, *variants])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--steps", type=float, required=True)
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy's sampling rate (-r)")
    ap.add_argument("--match", default="", help="comma-separated words; keep only frames containing one")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    words = [w for w in args.match.split(",") if w]
    per = collections.defaultdict(lambda: [0, collections.Counter(), collections.Counter()])
    with open(args.profile) as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        heads = [f for f in frames if f.startswith("process ")]
        worker = next((f for f in heads if "distsft/train.py" in f and "torch.distributed.run" not in f), None)
        thread = next((f for f in frames if f.startswith("thread ")), None)
        if worker is None or thread is None:
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames if not f.startswith(("process ", "thread "))]
        main_thread = "MainThread" in thread
        if not main_thread and ": " in thread:
            continue  # a named helper thread (a watchdog, a timer): not the loop's work
        if not frames or (main_thread and not any(f.startswith(LOOP) for f in frames)):
            continue
        key = (worker.split(":", 1)[0], mode_of(worker), "main" if main_thread else thread.split(")")[0] + ")")
        rec = per[key]
        rec[0] += int(n)
        for f in set(frames):
            if not words or any(w in f for w in words):
                rec[1][f] += int(n)
        rec[2][frames[-1]] += int(n)
    ms = lambda count: count / args.rate * 1000 / args.steps  # noqa: E731
    for (proc, mode, thread), (total, incl, self_) in sorted(per.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        print(f"\n=== {mode} ({proc}), {thread} thread: {ms(total):.1f} ms per step sampled")
        for frame, count in incl.most_common(args.top):
            print(f"  {ms(count):8.1f} incl {ms(self_.get(frame, 0)):7.1f} self  {frame[:140]}")


if __name__ == "__main__":
    main()
