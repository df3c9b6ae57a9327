"""Where ZeRO-3's per-step host time goes, inside the trainer as it runs (probe; see ../README.md).

Put this folder first on PYTHONPATH and set DISTSFT_ZERO3_SPLIT=1: every process then wraps a few of
DeepSpeed's stage-3 functions with a host-side timer (time.perf_counter, no device synchronisation, so the
run is not slowed down by the probe itself beyond two clock reads per call) and prints, at exit, the calls
per optimizer step and the host milliseconds per step of each, after `DISTSFT_ZERO3_SPLIT_SKIP` warm-up steps
(default 2). Nested functions are timed inside their callers (the table is not a partition).

    PYTHONPATH=launch/tools/probes/zero3_host_split:$PYTHONPATH DISTSFT_ZERO3_SPLIT=1 torchrun ... distsft/train.py ...
"""

import os

if os.environ.get("DISTSFT_ZERO3_SPLIT") == "1":
    import atexit
    import functools
    import importlib.machinery
    import sys
    import time

    _SKIP = int(os.environ.get("DISTSFT_ZERO3_SPLIT_SKIP", "2"))
    _steps = {"n": 0}
    _totals: dict[str, list[float]] = {}  # name -> [calls, seconds] after the warm-up steps
    _TARGETS = {  # module -> class -> methods
        "deepspeed.runtime.engine": {"DeepSpeedEngine": ["forward", "backward", "step", "_forward_prologue",
                                                         "_forward_epilogue"]},
        "deepspeed.runtime.zero.stage3": {"DeepSpeedZeroOptimizer_Stage3": [
            "step", "_partition_all_parameters", "_post_step", "_get_norm_groups", "_optimizer_step",
            "_reassign_or_swap_out_partitioned_parameters", "unscale_and_clip_grads", "reduce_leaf_module_grads",
            "reduce_independent_p_g_buckets_and_remove_grads", "independent_gradient_partition_epilogue",
            "_overflow_check_and_loss_scale_update", "zero_grad", "partition_grads",
            "_DeepSpeedZeroOptimizer_Stage3__add_grad_to_ipg_bucket",
            "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
            "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"]},
        "deepspeed.runtime.zero.partitioned_param_coordinator": {"PartitionedParameterCoordinator": [
            "fetch_sub_module", "release_sub_module", "release_and_reset_all", "reset_step"]},
        "deepspeed.runtime.zero.parameter_offload": {"ZeROOrderedDict": ["__getitem__"], "DeepSpeedZeRoOffload": [
            "pre_sub_module_forward_function", "post_sub_module_forward_function",
            "pre_sub_module_backward_function", "post_sub_module_backward_function"]},
        "deepspeed.runtime.zero.partition_parameters": {"NoGatherCoalescedHandle": ["__init__", "wait"],
                                                        "NoGatherHandle": ["__init__", "wait"]},
        "distsft.zero3_host": {"LayerGather": ["pre_forward", "post_forward", "backward_edge", "fetch", "release",
                                               "_start", "_wait"]},
        "distsft.qlora": {"Dequantized4bit": ["__call__"]},
        "distsft.recompute": {"_LayerCheckpoint": ["_fetch"]},
    }
    _FUNCTIONS = {  # module -> module-level functions (looked up as globals by their callers)
        "deepspeed.runtime.zero.partition_parameters": ["free_param"],
        "distsft.qlora": ["dequantize_4bit"],
    }

    def _wrap(cls, name: str, label: str) -> None:
        fn = cls.__dict__.get(name) if isinstance(cls, type) else None
        if fn is None:  # a module's function, or a method a class inherits (torch.Tensor's from C)
            fn = getattr(cls, name, None)
        if fn is None or not callable(fn):
            return

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if _steps["n"] >= _SKIP:
                    entry = _totals.setdefault(label, [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.perf_counter() - t
                if label == "DeepSpeedEngine.step":
                    _steps["n"] += 1

        setattr(cls, name, timed)

    class _Finder:  # wraps each target module's classes right after the module runs
        def find_spec(self, fullname, path=None, target=None):
            if fullname not in _TARGETS and fullname not in _FUNCTIONS:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                for cls_name, methods in _TARGETS.get(fullname, {}).items():
                    cls = getattr(module, cls_name, None)
                    for m in methods if cls is not None else ():
                        _wrap(cls, m, f"{cls_name}.{m}")
                for name in _FUNCTIONS.get(fullname, ()):
                    _wrap(module, name, f"{fullname.rsplit('.', 1)[-1]}.{name}")

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())

    def _wrap_torch() -> None:  # CUDA stream synchronisations and record_stream, wherever they come from
        import torch

        _wrap(torch.Tensor, "record_stream", "torch.Tensor.record_stream")
        if torch.cuda.is_available():
            _wrap(torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize")
            _wrap(torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")

    if os.environ.get("DISTSFT_ZERO3_SPLIT_TORCH") == "1":
        class _TorchFinder:
            def find_spec(self, fullname, path=None, target=None):
                if fullname != "distsft.zero3_host":
                    return None
                _wrap_torch()  # torch is imported by then
                return None

        sys.meta_path.insert(0, _TorchFinder())

    @atexit.register
    def _report() -> None:
        steps = max(_steps["n"] - _SKIP, 0)
        if not steps:
            return
        rank = os.environ.get("RANK", "0")
        lines = [f"[zero3 host split, rank {rank}] {steps} steps after {_SKIP} warm-up; "
                 "host ms per step (calls per step)"]
        for label, (calls, secs) in sorted(_totals.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"  {1000 * secs / steps:9.2f} ms  {calls / steps:8.1f}  {label}")
        print("\n".join(lines), file=sys.stderr, flush=True)
