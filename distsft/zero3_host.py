"""ZeRO-3's per-step host work, made cheaper (`distributed.zero3_fast_paths`).

At one GPU a ZeRO-3 step of a LoRA run is bound by DeepSpeed's Python rather than by the GPU: per layer
it fetches and releases parameters, per trainable tensor it moves a gradient, copies its reduced
partition and takes a norm, per parameter it releases at the step and gathers the persistent ones again
after it, and its step waits on the host for the gradient norm before it queues the update.
`speed_up_zero3` replaces ten of those pieces (thirteen at one rank), on the prepared engine's instances (and
DeepSpeed's debug-print helper), by code that does the same with less host work; each checks that the
DeepSpeed internals it replaces look as expected and otherwise leaves DeepSpeed's code in place. The
largest is `LayerGather`: the decoder layers gathered and released on a fixed schedule by two hooks
each, instead of four hooks each and DeepSpeed's trace-based coordinator. What they save on one GPU:
launch/results/zero_h100.md; that they change nothing else: tests/integration/test_distributed.py
(`test_zero3_fast_paths_change_only_host_work`, on 2 ranks, where the gathers are real all-gathers) and
tests/unit/test_zero_modes.py. Written against DeepSpeed 0.19.
"""

from __future__ import annotations

import logging

import torch

from distsft import census

logger = logging.getLogger(__name__)


def _plain_tensors():
    """Around DeepSpeed's gathering and release of whole layers: tensor subclasses' `__torch_function__` off.
    A 4-bit base weight is a bitsandbytes `Params4bit`, whose `__torch_function__` runs in Python for every
    tensor operation and attribute DeepSpeed touches per parameter (`.data` read and set, `.dtype`,
    `.device`, `record_stream`): reading dtype and device, allocating the empty tensor and setting `.data`,
    as a release does, took 8.4 us against 1.9 for a plain parameter (CI host, bitsandbytes 0.50).
    DeepSpeed only moves storage there; the subclass's override matters for `chunk`/`split` results,
    which it does not take."""
    return torch._C.DisableTorchFunctionSubclass()


def _release(params) -> None:
    """Free the gathered copies of `params` (each AVAILABLE, with its shard in `ds_tensor` and no secondary
    partition or NVMe copy: what `_needs_deepspeeds_gathering` rules out), as DeepSpeed's `partition` does
    for a parameter that was only read (`_partition_param` -> `free_param`): the memory kept from reuse
    until the compute stream is done with it, the data set to an empty tensor, the status NOT_AVAILABLE.
    DeepSpeed's path also formats two debug messages and two memory-report labels per parameter (each
    with the parameter's shape) that nothing prints, and brackets each free in NVTX ranges; a decoder
    layer is released twice a step and its base weights are 4-bit `Params4bit` tensors, whose attribute
    reads run Python (`_plain_tensors`). A parameter still marked in use by a module is refused, as there."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    accelerator = get_accelerator()
    stream = None if accelerator.is_synchronized_device() else accelerator.current_stream()
    with _plain_tensors():
        for p in params:
            if p.ds_active_sub_modules:
                raise RuntimeError(f"cannot release {p.ds_summary()}: still in use by a module")
            data = p.data
            if stream is not None and accelerator.on_accelerator(data):
                data.record_stream(stream)  # not reused before the queued kernels that read it have run
            p.data = torch.empty(0, dtype=data.dtype, device=data.device)
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE


def walk_once(module: torch.nn.Module, method: str) -> None:
    """Give this module instance a `named_parameters` or `named_modules` (`method`) that walks its tree once
    per set of arguments and then returns the same list; a call with a caller's own `memo` walks as usual.
    Under ZeRO-3 DeepSpeed asks each leaf layer for its parameters, recursively, in every fetch, release
    and gradient hook (thousands of walks per step, each through ~100 peft submodules of a decoder layer),
    and its engine walks every module of the model twice per forward (~2,700 for an 8B model with its
    adapter). The trees are fixed once the model is prepared (recomputation changes flags on the layers,
    not the tree; merging is refused under ZeRO-3); undone by deleting the instance attribute."""
    walk = getattr(module, method)  # the class's method, bound
    listed: dict[tuple, tuple] = {}

    def once(*args, **kwargs):
        if kwargs.get("memo") is not None or any(isinstance(a, set) for a in args):
            return walk(*args, **kwargs)
        key = (args, tuple(sorted(kwargs.items())))
        if key not in listed:
            listed[key] = tuple(walk(*args, **kwargs))
        return iter(listed[key])

    module.__dict__[method] = once


def _quiet_debug_prints() -> bool:
    """DeepSpeed's stage-3 modules call `print_rank_0(message, force=False)` a few times for every parameter
    they fetch, release or partition (thousands of calls per step), and each call asks the process group
    for the rank before it checks whether it prints at all. Replace it, in every module that holds it, by
    one that checks first and then calls the original: the same output, without the rank lookups. Once per
    process; returns whether every one of them is the quiet version."""
    import importlib

    modules = [importlib.import_module(f"deepspeed.runtime.zero.{name}")
               for name in ("partition_parameters", "partitioned_param_coordinator", "parameter_offload", "stage3")]
    for module in modules:
        original = getattr(module, "print_rank_0", None)
        if original is None or getattr(original, "_distsft_quiet", False):  # absent, or done by an earlier run
            continue

        def print_rank_0(message, debug=False, force=False, _original=original):
            if debug or force:
                _original(message, debug=debug, force=force)

        print_rank_0._distsft_quiet, print_rank_0.original = True, original
        module.print_rank_0 = print_rank_0
    return all(getattr(getattr(m, "print_rank_0", None), "_distsft_quiet", False) for m in modules)


def _fused_grad_norm(optimizer) -> bool:
    """The gradient norm of DeepSpeed's ZeRO-3 step (`get_grad_norm_direct`) launches a cast and a norm per
    trainable tensor (448 of each for an 8B LoRA adapter) and then sums them. For the 2-norm without model
    or expert parallelism, compute the same per-tensor norms, in the same precision, with one
    `torch._foreach_norm` (a few launches) and the same all-reduced sum of squares; everything else goes
    to DeepSpeed's own method. Returns whether the instance was given the fused version."""
    original = getattr(optimizer, "get_grad_norm_direct", None)
    needed = ("_get_param_partition_group", "model_parallel_group", "device")
    if original is None or not all(hasattr(optimizer, a) for a in needed):
        return False
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.utils import get_norm_dtype

    def get_grad_norm_direct(gradients, params, norm_type=2):
        expert = getattr(optimizer, "_autoep_expert_parallel_group", None)
        model_parallel = optimizer.model_parallel_group is not None and dist.get_world_size(
            group=optimizer.model_parallel_group) > 1
        if (float(norm_type) != 2.0 or not gradients or model_parallel
                or (expert is not None and expert(params) is not None)):
            return original(gradients, params, norm_type)
        device = torch.device(optimizer.device)  # the norms in fp64 where the device has it, as DeepSpeed
        norms = torch._foreach_norm([g if g.device == device else g.to(device, non_blocking=True)
                                     for g in gradients], 2.0, dtype=get_norm_dtype())
        total = torch.stack(norms).square().sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer._get_param_partition_group(params[0]))
        total = total.sqrt()
        return torch.where(total.isfinite(), total, torch.full_like(total, -1.0))  # no host copy: no sync

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def _bulk_release_at_step(offload, plain: bool) -> bool:
    """At every optimizer step DeepSpeed releases every parameter of the model (`partition_all_parameters`):
    one `partition` call per parameter through a torch.compile-disabled wrapper. After a LoRA backward the
    parameters still held are the persistent ones (the adapter and the norms, ~500 for an 8B model), which
    its `_post_step` gathers again right after the update. Release the same parameters together (`_release`
    where `plain`, i.e. not `_needs_deepspeeds_gathering`; else one `partition` call over the list), with the
    same checks before (in-flight gathers awaited, active-module marks cleared) and after (every parameter
    partitioned), except what is kept whole at one rank (`_keeps_layers_whole`, `_one_rank_persistent`).
    Returns whether the instance was given it."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    coordinator = offload.get_param_coordinator()
    prefix = "_PartitionedParameterCoordinator__"
    if not all(hasattr(coordinator, prefix + a) for a in ("inflight_param_registry", "n_available_params")):
        return False

    def partition_all_parameters():
        coordinator = offload.get_param_coordinator()
        inflight = getattr(coordinator, prefix + "inflight_param_registry")
        params = list(iter_params(offload.module, recurse=True))
        kept = getattr(offload, "_distsft_kept_whole", frozenset())  # ids of what LayerGather keeps gathered
        available = []
        for param in params:
            if param in inflight:
                inflight.pop(param).wait()
            param.ds_active_sub_modules.clear()
            if param.ds_status == ZeroParamStatus.AVAILABLE and id(param) not in kept:
                available.append(param)
        if available:
            with torch.no_grad(), _plain_tensors():
                if plain and all(p.ds_tensor is not None for p in available):
                    _release(available)
                else:
                    available[0].partition(param_list=available)
            setattr(coordinator, prefix + "n_available_params",
                    getattr(coordinator, prefix + "n_available_params") - sum(p.ds_numel for p in available))
        for param in params:
            if param.ds_status != ZeroParamStatus.NOT_AVAILABLE and id(param) not in kept:
                raise RuntimeError(f"{param.ds_summary()} expected to be released")

    offload.partition_all_parameters = partition_all_parameters
    return True


def _batched_gradient_bucket(optimizer) -> bool:
    """DeepSpeed's ZeRO-3 gradient hook of a leaf module (a decoder layer) moves its parameters' gradients
    into the reduce bucket one at a time, each with its own stream hand-over, copy and bookkeeping (14 LoRA
    tensors per layer, ~120 us of host time each on an H100 host). Defer each gradient the hook hands over
    and move the layer's gradients together when the hook reports it is done (`update_hook_state_and_
    maybe_run_epilogue`, and before the backward's epilogue): one stream hand-over, one foreach copy, the
    same bucket, the same flushes when it fills (the bucket is reduced whenever the next gradient would not
    fit, as DeepSpeed does). A configuration this does not cover (gradients not contiguous, ZenFlow,
    AutoEP's tensor-parallel folding, mixed communication dtypes or process groups, a gradient larger than
    the bucket) goes through DeepSpeed's own path, gradient by gradient. Returns whether it was installed."""
    from deepspeed.accelerator import get_accelerator

    flush_bucket = getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", None)
    needed = ("ipg_buckets", "reduce_bucket_size", "reduce_and_partition_stream", "get_param_comm_dtype",
              "_get_param_partition_group", "reduce_independent_p_g_buckets_and_remove_grads",
              "update_hook_state_and_maybe_run_epilogue", "independent_gradient_partition_epilogue")
    if flush_bucket is None or not all(hasattr(optimizer, a) for a in needed) or not optimizer.contiguous_gradients \
            or getattr(optimizer, "zenflow", False) or getattr(optimizer, "autoep_folding_tp_group", None) is not None:
        return False
    one_by_one = optimizer.reduce_independent_p_g_buckets_and_remove_grads
    hook_done = optimizer.update_hook_state_and_maybe_run_epilogue
    epilogue = optimizer.independent_gradient_partition_epilogue
    accelerator, pending = get_accelerator(), []
    straight = _one_rank_partitions(optimizer)
    optimizer._distsft_one_rank_gradients = straight is not None  # for the fast-path list in the log

    def add_to_bucket(params, dtype, group) -> None:  # all fit in the bucket's free space
        bucket = optimizer.ipg_buckets[dtype]
        stream = optimizer.reduce_and_partition_stream
        if not accelerator.resolves_data_dependency():
            stream.wait_stream(accelerator.current_stream())
        with accelerator.stream(stream):
            views, offset = [], bucket.elements
            for p in params:
                views.append(bucket.buffer.narrow(0, offset, p.grad.numel()).view_as(p.grad))
                offset += p.grad.numel()
            torch._foreach_copy_(views, [p.grad for p in params], non_blocking=True)
            record = not accelerator.is_synchronized_device()
            for p, view in zip(params, views, strict=True):
                if record:
                    p.grad.record_stream(accelerator.current_stream())
                p.grad.data = view
        bucket.params.extend(params)
        bucket.process_group = group
        bucket.elements = offset

    def move_pending() -> None:
        params = pending[:]
        pending.clear()
        if not params:
            return
        dtype, group = optimizer.get_param_comm_dtype(params[0]), optimizer._get_param_partition_group(params[0])
        size = optimizer.reduce_bucket_size
        if any(optimizer.get_param_comm_dtype(p) != dtype or optimizer._get_param_partition_group(p) is not group
               or not getattr(p, "ds_grad_is_ready", True) or p.grad is None or p.grad.numel() != p.ds_numel
               or p.ds_numel > size for p in params):
            for p in params:
                one_by_one(p)
            return
        with torch.no_grad():
            bucket = optimizer.ipg_buckets[dtype]
            if straight is not None and not bucket.params and straight(params, dtype, group):
                return
            if bucket.params and bucket.process_group != group:
                flush_bucket(dtype)
            start = 0
            while start < len(params):
                if bucket.elements > 0 and bucket.elements + params[start].ds_numel > size:
                    flush_bucket(dtype)
                end, filled = start, bucket.elements
                while end < len(params) and filled + params[end].ds_numel <= size:
                    filled += params[end].ds_numel
                    end += 1
                add_to_bucket(params[start:end], dtype, group)
                start = end

    def reduce_ready_partitions_and_remove_grads(param):
        if not getattr(optimizer, "_coalesce_grad_reduction", False):
            pending.append(param)

    def update_hook_state_and_maybe_run_epilogue(*args, **kwargs):
        move_pending()
        return hook_done(*args, **kwargs)

    def independent_gradient_partition_epilogue(*args, **kwargs):
        move_pending()
        return epilogue(*args, **kwargs)

    optimizer.reduce_ready_partitions_and_remove_grads = reduce_ready_partitions_and_remove_grads
    optimizer.update_hook_state_and_maybe_run_epilogue = update_hook_state_and_maybe_run_epilogue
    optimizer.independent_gradient_partition_epilogue = independent_gradient_partition_epilogue
    return True


def _grad_slots(optimizer):
    """ZeRO-3's map from a parameter's `ds_id` to its slot in the flat fp32 gradient buffer the optimizer
    steps on (None where the instance has none). Read at each use: DeepSpeed replaces the map when it
    offloads and reloads its state (`offload_states`, `reload_states`)."""
    return getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)


def _one_rank_partitions(optimizer):
    """Where a partition group has one rank (ZeRO-3 on one GPU), reducing a gradient bucket is the identity:
    DeepSpeed still copies each gradient into the bucket on its reduce stream (a stream hand-over and
    `record_stream` per gradient), lays the bucket out for a reduce-scatter of one rank (a second copy, a
    division by one, the collective call) and copies each result into the gradient's slot of the flat fp32
    buffer the optimizer steps on (a third copy, a `narrow` and a `record_stream` per gradient): ~20 host
    tensor operations per trainable tensor on the backward thread, 448 tensors a step for an 8B adapter.
    Returns a function that copies (or, while accumulating, adds) a layer's gradients straight into their
    slots in one foreach call on the compute stream, as `partition_grads` would have left them, or None
    where this does not apply: several ranks, the optimizer offloaded, swapped or ZenFlow, qgZ's all-to-all.
    The first step's census counts the tensors it moved (`zero3_gradients`: one_rank). It returns False
    (the bucket path then runs) for gradients whose communication dtype is not theirs, whose partition is
    padded, that DeepSpeed averages over more ranks than their partition group's (expert parallelism), or
    with gradient post-scaling by a pre-divide factor other than 1."""
    import deepspeed.comm as dist

    slots = _grad_slots(optimizer)
    needed = ("dp_process_group", "micro_step_id", "_offload_boundary_param_ids", "gradient_accumulation_dtype",
              "offload_optimizer", "postscale_gradients", "gradient_predivide_factor")
    if slots is None or not all(hasattr(optimizer, a) for a in needed) or optimizer.offload_optimizer \
            or getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "zenflow", False) \
            or getattr(optimizer, "all2all_process_group", None) is not None \
            or dist.get_world_size(group=optimizer.dp_process_group) != 1:
        return None

    averaging = getattr(optimizer, "_gradient_averaging_world_size", lambda params, world: world)
    shaped: dict[int, tuple] = {}  # ds_id -> (its slot, the slot viewed in the parameter's shape)

    def slot_of(slots, p):
        slot = slots[p.ds_id]
        cached = shaped.get(p.ds_id)
        if cached is None or cached[0] is not slot:
            cached = shaped[p.ds_id] = (slot, slot.narrow(0, 0, p.ds_numel).view(p.ds_shape))
        return cached[1]

    def straight(params, dtype, group) -> bool:
        slots = _grad_slots(optimizer)
        if dist.get_world_size(group=group) != 1 or averaging(params, 1) != 1 \
                or (optimizer.postscale_gradients and optimizer.gradient_predivide_factor != 1.0) \
                or any(p.grad.dtype != dtype or not p.grad.is_contiguous() or p.partition_numel() != p.ds_numel
                       or p.ds_id not in slots or p.grad.shape != p.ds_shape for p in params):
            return False
        buffers = [slot_of(slots, p) for p in params]
        grads = [p.grad for p in params]
        if optimizer.micro_step_id == 0:
            torch._foreach_copy_(buffers, grads)
        else:
            torch._foreach_add_(buffers, [g.to(optimizer.gradient_accumulation_dtype) for g in grads])
        for p in params:
            optimizer._offload_boundary_param_ids.add(p.ds_id)
            p.grad = None
        if census.ACTIVE is not None:  # the first step's census: what ran, per trainable tensor
            for p in params:
                census.note("zero3_gradients", "one_rank", str(p.ds_id))
        return True

    return straight


def _coalesced_reduce_scatter(optimizer) -> bool:
    """A gradient bucket's reduce-scatter (DeepSpeed's `__avg_scatter_grads`, `reduce_scatter_coalesced`) lays
    the bucket out rank by rank for one collective: per gradient it slices one piece per rank, checks and pads
    each one, and narrows each result, about world size + 3 tensor operations per gradient on the host at
    every flush (~170 gradients per bucket for an 8B adapter). Build the same layout with one `split` per
    gradient and one `cat`, and split this rank's result in one call: the same pre-division, the same
    collective on the same values, the same partitions. A bucket that needs anything else (a communication
    dtype other than the parameters', gradient pre-/post-scaling, qgZ's all-to-all, expert parallelism, an
    empty gradient) goes through DeepSpeed's method. Returns whether the instance was given this one."""
    from deepspeed import comm as dist
    from deepspeed.runtime.comm.coalesced_collectives import _torch_reduce_scatter_fn

    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    original = getattr(optimizer, name, None)
    needed = ("_get_param_partition_group", "_assert_same_partition_group", "_autoep_expert_parallel_group", "dtype",
              "gradient_accumulation_dtype", "postscale_gradients", "gradient_predivide_factor")
    if original is None or not all(hasattr(optimizer, a) for a in needed):
        return False

    @torch.no_grad()
    def avg_scatter_grads(params, communication_data_type):
        if (communication_data_type != optimizer.dtype
                or optimizer.gradient_accumulation_dtype != communication_data_type
                or (optimizer.postscale_gradients and optimizer.gradient_predivide_factor != 1.0)
                or getattr(optimizer, "all2all_process_group", None) is not None
                or optimizer._autoep_expert_parallel_group(params) is not None
                or any(p.grad.numel() == 0 for p in params)):
            return original(params, communication_data_type)
        optimizer._assert_same_partition_group(params)
        group = optimizer._get_param_partition_group(params[0])
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        rows: list[list[torch.Tensor]] = [[] for _ in range(world)]  # rank r's pieces, gradient by gradient
        sizes, numels, spare = [], [], None
        for p in params:
            grad = p.grad.view(-1)
            n = grad.numel()
            size = -(-n // world)  # each rank's share, the last ones padded
            parts = grad.split(size)
            for r in range(world):
                part = parts[r] if r < len(parts) else grad[:0]
                rows[r].append(part)
                if part.numel() < size:
                    if spare is None or spare.numel() < size:
                        spare = torch.empty(size, dtype=grad.dtype, device=grad.device)
                    rows[r].append(spare[:size - part.numel()])  # padding (never read back)
            sizes.append(size)
            numels.append(n)
        flat = torch.cat([piece for row in rows for piece in row])
        flat.div_(world)  # pre-divided, as DeepSpeed does
        share = sum(sizes)
        mine = flat.narrow(0, rank * share, share)
        _torch_reduce_scatter_fn(flat, mine, group=group)
        out = list(mine.split(sizes))
        for i, (n, size) in enumerate(zip(numels, sizes, strict=True)):
            kept = max(0, min(size, n - rank * size))
            if kept != size:
                out[i] = out[i].narrow(0, 0, kept)
        return out

    setattr(optimizer, name, avg_scatter_grads)
    return True


def _batched_grad_partitions(optimizer) -> bool:
    """After reducing a gradient bucket, DeepSpeed's `partition_grads` copies (or, while accumulating, adds)
    each parameter's reduced partition into its slot of the flat gradient buffer the optimizer steps on:
    one copy kernel and its bookkeeping per trainable tensor (448 per step for an 8B adapter, every
    bucket flush). Do the same bookkeeping per parameter and the copies (additions) in one foreach call
    over the bucket. With the optimizer offloaded (or swapped, or ZenFlow) DeepSpeed's own method runs:
    its buffers are in host memory. Returns whether the instance was given the batched version."""
    from deepspeed.accelerator import get_accelerator

    original = getattr(optimizer, "partition_grads", None)
    slots = _grad_slots(optimizer)
    needed = ("micro_step_id", "_get_param_partition_rank", "_offload_boundary_param_ids",
              "gradient_accumulation_dtype", "offload_optimizer")
    if original is None or slots is None or not all(hasattr(optimizer, a) for a in needed):
        return False
    accelerator = get_accelerator()

    def partition_grads(params, grad_partitions):
        if optimizer.offload_optimizer or getattr(optimizer, "swap_optimizer", False) \
                or getattr(optimizer, "zenflow", False):
            return original(params, grad_partitions)
        accumulate = optimizer.micro_step_id != 0
        stream = None if accelerator.is_synchronized_device() else accelerator.current_stream()
        slots, buffers, sources = _grad_slots(optimizer), [], []
        for param, part in zip(params, grad_partitions, strict=True):
            if param.partition_numel() * optimizer._get_param_partition_rank(param) >= param.ds_numel:
                param.grad = None  # this rank's partition of it is padding only
                continue
            optimizer._offload_boundary_param_ids.add(param.ds_id)
            buffer = slots[param.ds_id].narrow(0, 0, part.numel())
            buffers.append(buffer)
            sources.append(part.to(optimizer.gradient_accumulation_dtype).view(buffer.shape) if accumulate else part)
            if stream is not None and param.grad is not None:
                param.grad.record_stream(stream)
            param.grad = None
        if buffers:
            if accumulate:
                torch._foreach_add_(buffers, sources)
            else:
                torch._foreach_copy_(buffers, sources, non_blocking=True)
        return buffers

    optimizer.partition_grads = partition_grads
    return True


def _after_compute(stream, params) -> None:
    """Order a gather of `params` on the side `stream` after the work queued so far on the compute stream,
    which may have written their partitions (the optimizer step's update). Only where the gather reads them
    on the GPU: at a partition of one rank DeepSpeed's "gather" is a view, and its handle's wait then
    synchronises the side stream with the host, which must not wait for the compute stream."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    group = getattr(params[0], "ds_process_group", None)
    if not get_accelerator().resolves_data_dependency() and dist.get_world_size(group=group) > 1:
        stream.wait_stream(get_accelerator().current_stream())


def _coalesced_persistent_gather(engine, offload) -> bool:
    """After its optimizer step DeepSpeed gathers the persistent parameters again (the adapter and the norms,
    ~500 for an 8B model; its step released them), with a blocking gather that launches one all-gather per
    parameter and, at one rank, synchronises the compute stream. Gather them with one coalesced call per
    dtype on DeepSpeed's all-gather stream instead, which the compute stream then waits for: the same
    values, without the per-parameter collectives or the host waiting for the GPU. With the optimizer
    offloaded (or swapped) DeepSpeed's own `_post_step` runs. Returns whether the instance was given it."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    optimizer = engine.optimizer
    original = getattr(optimizer, "_post_step", None)
    needed = ("persistent_parameters", "invalidate_secondary_tensor", "timers", "offload_optimizer")
    if original is None or offload is None or not all(hasattr(optimizer, a) for a in needed) \
            or _needs_deepspeeds_gathering(engine, offload):
        return False
    stream = getattr(offload, "_DeepSpeedZeRoOffload__allgather_stream", None)
    accelerator = get_accelerator()

    def _post_step(timer_names):
        if optimizer.offload_optimizer or getattr(optimizer, "swap_optimizer", False):
            return original(timer_names)
        todo = [p for p in optimizer.persistent_parameters if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if todo:
            if stream is None:
                todo[0].all_gather_coalesced(todo).wait()
            else:
                _after_compute(stream, todo)  # the partitions the update just wrote
                with accelerator.stream(stream):
                    todo[0].all_gather_coalesced(todo).wait()
                accelerator.current_stream().wait_stream(stream)
        _views_of_partitions(getattr(offload, "_distsft_kept_persistent", ()))  # kept whole at one rank
        optimizer.invalidate_secondary_tensor()
        optimizer.timers.log(timer_names)

    optimizer._post_step = _post_step
    optimizer._distsft_post_step = True
    return True


def _views_in_order(flat, tensors) -> bool:
    """Whether `tensors` are contiguous views of `flat`, one after another from its start: what DeepSpeed's
    unflatten makes them (`torch._utils._unflatten_dense_tensors`)."""
    if any(t.dtype != flat.dtype or not t.is_contiguous() for t in tensors):
        return False
    address, size = flat.data_ptr(), flat.element_size()
    for t in tensors:
        if t.data_ptr() != address:
            return False
        address += t.numel() * size
    return address <= flat.data_ptr() + flat.numel() * size


def _reassign_partitions(optimizer, sub_group_id) -> None:
    """DeepSpeed's `_reassign_or_swap_out_partitioned_parameters`: after the update, the fp32 partitions are
    copied into the flat low-precision buffer and every parameter's partition (`ds_tensor`) is made a view
    of it again (448 `.data` swaps a step for an 8B adapter). After the first step they already are those
    views, so the copy is all that is needed; any that is not (a reload, a swap) gets DeepSpeed's
    re-pointing, as does a swapped sub-group."""
    flat = optimizer.fp16_partitioned_groups_flat[sub_group_id]
    if flat is None:
        return optimizer._reassign_or_swap_out_partitioned_parameters(sub_group_id)
    flat.data.copy_(optimizer.fp32_partitioned_groups_flat[sub_group_id].data)
    if not _views_in_order(flat, optimizer.fp16_partitioned_groups[sub_group_id]):
        optimizer._unflatten_partitioned_parameters(sub_group_id)


def _step_skipped_on_device(optimizer) -> bool:
    """DeepSpeed's ZeRO-3 step asks the host whether the gradient norm is finite (`is_invalid_grad_norm`,
    a non-finite norm skips the update) before it queues any of the update: the host waits there for the
    whole backward, and then the GPU waits while the host runs the rest of the step (clipping, the update,
    the copy back to the bf16 partitions, the gather after it). With a fused torch Adam/AdamW as the client
    optimizer the skip can be decided on the device instead: the norm's non-finiteness goes to the fused
    kernel as `found_inf` (the mechanism of torch's GradScaler), which then leaves the parameters, both
    moments and the step count as they were, as DeepSpeed's skip does, and the reported norm is infinite,
    as DeepSpeed reports a skipped step's. Not for fp16 (its loss scaler needs the host's answer), an
    offloaded or swapped optimizer, ZenFlow, Muon or torch autocast's scaler: DeepSpeed's own step runs.
    What differs: a step skipped this way is not counted in the engine's `skipped_steps` (the trainer
    counts it from the norm: `train/skipped_steps`), and DeepSpeed's warning about allocator cache
    flushes, which reads the allocator's statistics every step, is not given. The copy of the update
    back to the low-precision partitions is `_reassign_partitions` (DeepSpeed's re-pointing of each
    partition only where it is needed). Returns whether the instance was given this step."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    client = getattr(optimizer, "optimizer", None)
    needed = ("_pre_step", "_partition_all_parameters", "_get_norm_groups", "fp16_groups", "_prepare_sub_group",
              "unscale_and_clip_grads", "_optimizer_step", "_reassign_or_swap_out_partitioned_parameters",
              "fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat", "fp16_partitioned_groups",
              "_unflatten_partitioned_parameters",
              "_release_sub_group", "_post_step", "zero_grad", "loss_scale", "timers", "dtype")
    if not isinstance(client, torch.optim.Adam | torch.optim.AdamW) or not client.defaults.get("fused") \
            or not all(hasattr(optimizer, a) for a in needed):
        return False
    original = optimizer.step

    def deepspeeds_step_needed() -> bool:
        return (optimizer.dtype == torch.float16 or optimizer.offload_optimizer
                or getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "zenflow", False)
                or getattr(optimizer, "use_muon", False) or getattr(optimizer, "torch_autocast_gradscaler", None)
                or getattr(optimizer, "dynamic_loss_scale", False) or optimizer.loss_scale != 1.0)

    def step(closure=None):
        if deepspeeds_step_needed():
            return original(closure)
        optimizer._pre_step()
        optimizer._partition_all_parameters()
        optimizer.overflow = False
        norm = combine_grad_norm_groups(optimizer._get_norm_groups())  # +inf where any group's was invalid
        invalid = ~torch.isfinite(norm) | (norm < 0)
        optimizer._global_grad_norm = torch.where(invalid, torch.full_like(norm, float("inf")), norm)
        timer_names = {"optimizer_step"}
        optimizer.timers("optimizer_step").start()
        optimizer.zero_grad(set_to_none=True)  # the partitions hold the gradients now, as in DeepSpeed's step
        client.found_inf = invalid.to(torch.float32)
        try:
            for sub_group_id in range(len(optimizer.fp16_groups)):
                optimizer._prepare_sub_group(sub_group_id, timer_names)
                optimizer.unscale_and_clip_grads(sub_group_id, norm)
                optimizer._optimizer_step(sub_group_id)
                _reassign_partitions(optimizer, sub_group_id)
                optimizer._release_sub_group(sub_group_id, timer_names)
        finally:
            del client.found_inf
        optimizer.timers("optimizer_step").stop()
        optimizer._post_step(timer_names)

    optimizer.step = step
    return True


class _BackwardEdge(torch.autograd.Function):
    """The identity, marking where a layer's backward starts or ends: on its output (`before`: when the
    gradient arrives, gather the layer for its backward) or on each of its inputs that require grad (when
    the last of their gradients is computed, the layer's backward is done: release it)."""

    @staticmethod
    def forward(ctx, gather, index, before, x):
        ctx.gather, ctx.index, ctx.before = gather, index, before
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        ctx.gather.backward_edge(ctx.index, ctx.before)
        return None, None, None, grad


class LayerGather:
    """ZeRO-3's gathering of whole decoder layers (DeepSpeed leaf modules), without DeepSpeed's per-module
    coordinator. DeepSpeed puts four hooks on each leaf layer and runs each fetch and release through its
    trace-based coordinator (a trace check, the prefetch queue, per-parameter registries and events: ~0.5 ms
    of host time per fetch and ~0.3 ms per release on an H100 host, two of each per layer per step). The
    layers always run in the same order, so the schedule needs no trace: the forward gathers layer i and
    starts gathering i + 1 on DeepSpeed's all-gather stream; after the layer's forward its gathered copies
    are released; when the gradient of its output arrives the backward gathers it again and starts on
    i - 1; when the gradients of its inputs are computed it is released. The gathering itself is
    DeepSpeed's (`all_gather_coalesced` over the layer's partitioned parameters, one call per layer; a
    no-op view at one rank), the release is `_release` (what DeepSpeed's `partition` does; at one rank,
    `keep_whole`, none: the layers stay gathered); persistent parameters (the adapter, the
    norms) are gathered when DeepSpeed has partitioned them (at the start, and after its optimizer step
    releases everything) and never released here, as in DeepSpeed. The other modules (embeddings, final
    norm, head) stay with DeepSpeed's coordinator. The kernel census of the first step
    counts the layers gathered this way (`zero3_layer_gather`: forward, backward; kept_whole where a
    release was skipped)."""

    def __init__(self, layers, stream, keep_whole: bool = False):
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.layers, self.stream, self.status = list(layers), stream, ZeroParamStatus
        self.accelerator = get_accelerator()
        self.params = [list(layer.parameters()) for layer in self.layers]  # gathered when partitioned
        self.releasable = [[p for p in params if not p.ds_persist] for params in self.params]
        self.keep_whole = keep_whole  # see `_keeps_layers_whole`: gathered once, then never released here
        self.inflight: dict[int, object] = {}
        self.waiting_grads = [0] * len(self.layers)

    def kept_whole(self) -> list:
        """The parameters this schedule never releases (none unless `keep_whole`)."""
        return [p for params in self.releasable for p in params] if self.keep_whole else []

    def _start(self, i: int) -> None:
        """Start gathering layer i (returns at once; `_wait` finishes it)."""
        if not 0 <= i < len(self.layers) or i in self.inflight:
            return
        todo = [p for p in self.params[i] if p.ds_status == self.status.NOT_AVAILABLE]
        if todo:
            if self.stream is None:
                with _plain_tensors():
                    self.inflight[i] = todo[0].all_gather_coalesced(todo)
            else:
                _after_compute(self.stream, todo)
                with self.accelerator.stream(self.stream), _plain_tensors():
                    self.inflight[i] = todo[0].all_gather_coalesced(todo)

    def _wait(self, i: int) -> None:
        handle = self.inflight.pop(i, None)
        if handle is None:
            return
        if self.stream is None:
            with _plain_tensors():
                handle.wait()
            return
        with self.accelerator.stream(self.stream), _plain_tensors():
            handle.wait()
        self.accelerator.current_stream().wait_stream(self.stream)

    def fetch(self, i: int, then: int) -> None:
        """Layer i whole on this rank (gathered now unless already under way), and layer `then` started."""
        self._start(i)
        self._wait(i)
        self._start(then)

    def release(self, i: int) -> None:
        self._wait(i)  # a prefetch never used (a forward that stopped early) is finished before it is freed
        if self.keep_whole:
            census.note("zero3_layer_gather", "kept_whole", str(i))
            return
        held = [p for p in self.releasable[i] if p.ds_status == self.status.AVAILABLE]
        if held:
            _release(held)  # LayerGather runs only where `_release` applies (`_gather_layers_ourselves`)

    def backward_edge(self, i: int, before: bool) -> None:
        if before:  # layer i's output gradient: its backward is next; start on the layer before it
            self.fetch(i, i - 1)
            census.note("zero3_layer_gather", "backward", str(i))
            return
        self.waiting_grads[i] -= 1
        if self.waiting_grads[i] == 0:
            self.release(i)

    def release_all(self) -> None:
        """Finish and free the gathers still under way (a prefetch no forward used), before the optimizer
        step's own release of every parameter (which frees what is gathered and requires none in flight)."""
        for i in list(self.inflight):
            self.release(i)

    def pre_forward(self, module, args, kwargs):
        i = module._distsft_layer_index
        self.fetch(i, i + 1)
        census.note("zero3_layer_gather", "forward", str(i))
        if not torch.is_grad_enabled():
            return None
        self.waiting_grads[i] = 0

        def wrap(x):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                self.waiting_grads[i] += 1
                return _BackwardEdge.apply(self, i, False, x)
            return x

        args = tuple(wrap(a) for a in args)
        kwargs = {k: wrap(v) for k, v in kwargs.items()}
        return args, kwargs

    def post_forward(self, module, args, output):
        i = module._distsft_layer_index
        self.release(i)
        if not torch.is_grad_enabled():
            return None
        if isinstance(output, torch.Tensor):
            return _BackwardEdge.apply(self, i, True, output) if output.requires_grad else output
        if isinstance(output, (tuple, list)):
            wrapped = [_BackwardEdge.apply(self, i, True, o) if isinstance(o, torch.Tensor) and o.requires_grad
                       else o for o in output]
            return type(output)(wrapped)
        if output is not None:
            raise TypeError(f"{type(module).__name__} returned a {type(output).__name__}: distsft's ZeRO-3 layer "
                            "gathering needs a tensor or a tuple of tensors (set distributed.zero3_fast_paths=false)")
        return None


def _needs_deepspeeds_gathering(engine, offload) -> bool:
    """ZeRO++ quantized weights or its secondary (hpZ) partitions, or parameters swapped to NVMe: DeepSpeed's
    coordinator gathers those with their quantization, per secondary-tensor group, and with the swapper's
    buffers; `LayerGather` and the persistent gather at the step only do the plain coalesced gather."""
    return bool(getattr(offload, "zero_quantized_weights", True)
                or getattr(offload, "zero_quantized_nontrainable_weights", True)
                or getattr(offload, "zero_param_parallel_group", None) is not None
                or getattr(engine.optimizer, "zero_hpz_partition_size", 1) > 1
                or str(getattr(offload, "offload_device", None)).endswith("nvme"))


def _whole_at_one_rank(params) -> bool:
    """Every one of `params` partitioned over one rank, its partition on the accelerator and unpadded: there
    a gather (`NoGatherHandle`) makes the parameter a view of its partition, and a release frees nothing."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return bool(params) and all(
        dist.get_world_size(group=p.ds_process_group) == 1 and p.ds_tensor is not None
        and accelerator.on_accelerator(p.ds_tensor) and p.ds_tensor.numel() == p.ds_numel for p in params)


def _views_of_partitions(params) -> None:
    """Make each gathered (AVAILABLE) one of `params`, kept whole at one rank, a view of its partition again
    where it no longer is one (DeepSpeed gave it a new `ds_tensor`): the whole parameter at one rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for p in params:
        if p.ds_status == ZeroParamStatus.AVAILABLE and p.data.data_ptr() != p.ds_tensor.data_ptr():
            p.data = p.ds_tensor.data.view(p.ds_shape)


def _one_rank_persistent(engine) -> list:
    """The persistent parameters (the adapter, the norms: ~500 for an 8B model) to keep whole through the
    optimizer step at one rank, or none. DeepSpeed releases them at every step and gathers them again right
    after the update (`_post_step`): at one rank both are host work only, because the gathered parameter
    is a view of its partition, which the update writes in place. Only with distsft's `_post_step`
    (`_coalesced_persistent_gather`), which after each step checks that each one is still a view of its
    partition and makes it one again if DeepSpeed moved the partition, and without an offloaded or swapped
    optimizer."""
    optimizer = engine.optimizer
    if not getattr(optimizer, "_distsft_post_step", False) or optimizer.offload_optimizer \
            or getattr(optimizer, "swap_optimizer", False):
        return []
    params = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
    return params if _whole_at_one_rank(params) else []


def _keeps_layers_whole(layers) -> bool:
    """Whether the decoder layers' partitioned parameters can stay gathered between uses: where each one's
    partition group has one rank and its partition (`ds_tensor`) is on the accelerator (no parameter
    offload), DeepSpeed's gather (`NoGatherHandle`) makes the parameter a view of that partition and its
    release frees no memory, so gathering and releasing every layer twice a step is host work and nothing
    else (7 tensors per layer of status changes, `.data` swaps, `record_stream` and a stream
    synchronisation). Such parameters are gathered at their layer's first use and then left whole; the
    optimizer step does not release them either (`_bulk_release_at_step`). Anything that partitions them
    on its own (DeepSpeed's `GatheredParameters`, its full release where the bulk one is not installed)
    only means the next use gathers them again."""
    return _whole_at_one_rank([p for layer in layers for p in layer.parameters() if not p.ds_persist])


def _gather_layers_ourselves(engine, offload) -> LayerGather | None:
    """Replace DeepSpeed's four hooks on every leaf decoder layer by a `LayerGather`'s two. Only when every
    leaf layer carries exactly DeepSpeed's four hooks from `offload` (else DeepSpeed's stay: returns None)."""
    from deepspeed.utils import z3_leaf_module

    layers = [m for m in engine.module.modules() if z3_leaf_module(m)]
    if not layers or offload is None or not hasattr(offload, "forward_hooks"):
        return None
    if _needs_deepspeeds_gathering(engine, offload):
        return None
    if any(z3_leaf_module(m) for layer in layers for m in layer.modules() if m is not layer):
        return None  # nested leaves: the schedule would not be one layer after another
    dicts = {id(d) for layer in layers for d in (layer._forward_pre_hooks, layer._forward_hooks)}
    handles = [h for h in (*offload.forward_hooks, *offload.backward_hooks)
               if (d := h.hooks_dict_ref()) is not None and id(d) in dicts]
    if len(handles) != 4 * len(layers) or any(len(layer._forward_pre_hooks) + len(layer._forward_hooks) < 4
                                             for layer in layers):
        return None
    gather = LayerGather(layers, getattr(offload, "_DeepSpeedZeRoOffload__allgather_stream", None),
                         keep_whole=_keeps_layers_whole(layers))
    for handle in handles:
        handle.remove()
    removed = {id(h) for h in handles}
    offload.forward_hooks[:] = [h for h in offload.forward_hooks if id(h) not in removed]
    offload.backward_hooks[:] = [h for h in offload.backward_hooks if id(h) not in removed]
    for i, layer in enumerate(layers):
        layer._distsft_layer_index = i
        layer.register_forward_pre_hook(gather.pre_forward, with_kwargs=True)
        layer.register_forward_hook(gather.post_forward)
    # The module that holds the layer list (the decoder): its forward starts gathering the first layer
    # (under way while the embeddings run) and, ahead of a backward, the last one (while the final norm,
    # the head and the loss run), as DeepSpeed's trace-based prefetch does across those modules.
    decoder = next((m for m in engine.module.modules() for c in m.children()
                    if isinstance(c, torch.nn.ModuleList) and any(x is layers[0] for x in c)), None)
    if decoder is not None:
        decoder.register_forward_pre_hook(lambda module, args: gather._start(0))
        decoder.register_forward_hook(
            lambda module, args, out: gather._start(len(layers) - 1) if torch.is_grad_enabled() else None)
    return gather


ONE_RANK_GRADIENTS = "at one rank, each layer's gradients copied straight into their partitions"
ONE_RANK_LAYERS = "at one rank, the decoder layers gathered once and kept whole"
ONE_RANK_PERSISTENT = "at one rank, the persistent parameters kept whole through the optimizer step"


def speed_up_zero3(engine, enabled: bool) -> list[str]:
    """After `prepare` under ZeRO-3: replace ten of DeepSpeed's per-step host costs (thirteen at one rank) by
    equivalents (`distributed.zero3_fast_paths`; what they save on one H100 is in launch/results/zero_h100.md).
    At one GPU and an 8B adapter the step is bound by DeepSpeed's Python, not by the GPU, so host work
    per parameter is what ZeRO-3 costs. Returns the names of what was replaced, for the log; warns naming
    any that could not be (DeepSpeed's own code then runs for it)."""
    optimizer = getattr(engine, "optimizer", None)
    if not enabled or engine is None or type(optimizer).__name__ != "DeepSpeedZeroOptimizer_Stage3":
        return []
    offload = getattr(optimizer, "parameter_offload", None)

    def list_modules() -> bool:
        if not isinstance(getattr(engine, "module", None), torch.nn.Module):
            return False
        walk_once(engine.module, "named_modules")
        return True

    def gather_layers() -> bool:
        gather = _gather_layers_ourselves(engine, offload)
        if gather is None:
            return False
        persistent = _one_rank_persistent(engine) if gather.keep_whole else []
        offload._distsft_kept_persistent = persistent
        offload._distsft_kept_whole = frozenset(id(p) for p in (*gather.kept_whole(), *persistent))  # the bulk
        # release at the step skips them
        release_every = offload.partition_all_parameters  # DeepSpeed's, or the bulk one below: either way,

        def partition_all_parameters():  # what our schedule still holds is finished and freed first
            gather.release_all()
            return release_every()

        offload.partition_all_parameters = partition_all_parameters
        return True

    candidates = {
        "the module tree listed once": list_modules,
        "debug prints checked before the rank lookup": _quiet_debug_prints,
        "gradient norm in one foreach launch": lambda: _fused_grad_norm(optimizer),
        "each layer's gradients moved into the reduce bucket together": lambda: _batched_gradient_bucket(optimizer),
        "gradient buckets reduce-scattered with one split per gradient": lambda: _coalesced_reduce_scatter(optimizer),
        ONE_RANK_GRADIENTS: lambda: getattr(optimizer, "_distsft_one_rank_gradients", False),
        "reduced gradient partitions copied in one foreach call": lambda: _batched_grad_partitions(optimizer),
        "parameters released in one call at the step":
            lambda: offload is not None and _bulk_release_at_step(
                offload, plain=not _needs_deepspeeds_gathering(engine, offload)),
        "persistent parameters gathered in one call after the step":
            lambda: _coalesced_persistent_gather(engine, offload),
        "non-finite gradients skipped on the device, without waiting for the norm":
            lambda: _step_skipped_on_device(optimizer),
        "decoder layers gathered on a fixed schedule": gather_layers,
        ONE_RANK_LAYERS: lambda: bool(getattr(offload, "_distsft_kept_whole", None)),
        ONE_RANK_PERSISTENT: lambda: bool(getattr(offload, "_distsft_kept_persistent", None)),
    }
    done = [name for name, install in candidates.items() if install()]
    if missing := [name for name in candidates if name not in done and not (
            name in (ONE_RANK_GRADIENTS, ONE_RANK_LAYERS, ONE_RANK_PERSISTENT)
            and getattr(optimizer, "partition_count", 1) != 1)]:
        logger.warning("ZeRO-3 host fast paths not installed, DeepSpeed's own code runs instead (its internals "
                       "are not what they replace, or the configuration needs DeepSpeed's path): %s",
                       "; ".join(missing))
    return done
