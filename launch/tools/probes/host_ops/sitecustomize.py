"""How many tensor operations does the host dispatch in one training step, and from where? (probe; see
../README.md)

Put this folder first on PYTHONPATH and set DISTSFT_HOST_OPS=1: every process profiles the host side of
optimizer step DISTSFT_HOST_OPS_STEP (default 4; steps are counted by torch's global optimizer-step hook,
which DeepSpeed's engine also reaches) with torch.profiler, and prints at exit the number of top-level
`aten::` operations in that step (those not called from another `aten::` operation), per thread and per
the nearest Python frame of distsft, its kernels, DeepSpeed, peft or transformers that called them. On a
machine without a GPU the count stands in for the host time of a step that is bound by the host: each
operation costs a few microseconds of dispatch on any machine.

    PYTHONPATH=launch/tools/probes/host_ops:$PYTHONPATH DISTSFT_HOST_OPS=1 torchrun ... distsft/train.py ...
"""

import os

if os.environ.get("DISTSFT_HOST_OPS") == "1":
    import atexit
    import collections
    import sys

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _STEP = int(os.environ.get("DISTSFT_HOST_OPS_STEP", "4"))
    _OURS = ("distsft", "deepspeed", "peft", "transformers")
    _state: dict = {"steps": 0, "profile": None, "by_frame": None, "by_thread": None}

    def _caller(event) -> str:
        parent = event.cpu_parent
        while parent is not None:
            if any(name in parent.name for name in _OURS) and "profiler" not in parent.name:
                return parent.name
            parent = parent.cpu_parent
        return "(no frame of distsft, DeepSpeed, peft or transformers)"

    def _after_step(optimizer, args, kwargs) -> None:
        _state["steps"] += 1
        if _state["steps"] == _STEP - 1:  # the step after this hook is the one profiled
            _state["profile"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       with_stack=True)
            _state["profile"].__enter__()
        elif _state["steps"] == _STEP and _state["profile"] is not None:
            profile, _state["profile"] = _state["profile"], None
            profile.__exit__(None, None, None)
            by_frame, by_thread = collections.Counter(), collections.Counter()
            for event in profile.events():
                parent = event.cpu_parent
                if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
                    continue
                by_frame[_caller(event)] += 1
                by_thread[event.thread] += 1
            _state["by_frame"], _state["by_thread"] = by_frame, by_thread

    register_optimizer_step_post_hook(_after_step)

    @atexit.register
    def _report() -> None:
        by_frame = _state["by_frame"]
        if by_frame is None:
            if not _state["steps"]:  # a process that trains nothing (torchrun's agent)
                return
            print(f"[host_ops] pid {os.getpid()}: step {_STEP} was not reached ({_state['steps']} steps)",
                  file=sys.stderr)
            return
        threads = ", ".join(f"thread {t}: {n}" for t, n in sorted(_state["by_thread"].items()))
        print(f"[host_ops] pid {os.getpid()}, step {_STEP}: {sum(by_frame.values())} top-level tensor operations "
              f"({threads})", file=sys.stderr)
        for frame, n in by_frame.most_common(int(os.environ.get("DISTSFT_HOST_OPS_TOP", "25"))):
            print(f"  {n:7d}  {frame}", file=sys.stderr)
