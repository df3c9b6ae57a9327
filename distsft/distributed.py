"""Process groups and DeepSpeed plumbing: what the loop needs to run the same on 1 process, DDP, and
DeepSpeed ZeRO-1/2/3 (with or without CPU offload). Exit codes and preemption live in distsft/lifecycle.py.

The mode comes from the launcher: `accelerate launch --config_file accelerate_configs/<mode>.yaml`, or
`torchrun` with `distributed.deepspeed_config=ds_configs/zeroN.json` in the run config (both end up in
an Accelerator with a DeepSpeedPlugin). Batch sizes, accumulation and clipping are the trainer's: the
DeepSpeed JSON says "auto" for them and `configure_deepspeed` fills them in before `prepare`;
`StepBackend` then runs each step's backward and update the same way in every mode.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from datetime import timedelta

import torch

from distsft.config import DistributedConfig
from distsft.dtypes import resolve_dtype
from distsft.zero3_host import speed_up_zero3, walk_once

logger = logging.getLogger(__name__)


def requested_deepspeed(cfg: DistributedConfig) -> dict | None:
    """The DeepSpeed config this launch asks for, before anything is built: `distributed.deepspeed_config`
    (torchrun), or what `accelerate launch --config_file <zeroN.yaml>` put into the environment; None for
    no DeepSpeed. Only `zero_optimization` (stage, offload sections) is read from it here."""
    if cfg.deepspeed_config:
        path = cfg.deepspeed_config
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path or path == "none":  # the stage and offload devices come as variables of their own
            zero = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
            for key in ("offload_optimizer", "offload_param"):
                device = os.environ.get(f"ACCELERATE_DEEPSPEED_{key.upper()}_DEVICE", "none")
                if device != "none":
                    zero[key] = {"device": device}
            return {"zero_optimization": zero}
    else:
        return None
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise ValueError(f"distributed.deepspeed_config: cannot read {path}: {e}") from e


ZERO12_DDP_MAX_SAVING = 1 << 30
"""`distributed.zero12=auto`: ZeRO-1/2 run as DDP when partitioning would save less than this per GPU."""


def zero12_as_ddp(cfg: DistributedConfig, ds: dict | None, trainable_numel: int | None, world: int
                  ) -> str | None:
    """Whether a ZeRO-1/2 launch runs as DDP (`distributed.zero12`), and why: the reason, or None to keep
    DeepSpeed (or when no ZeRO-1/2 config was asked for).

    ZeRO-1/2 partition the optimizer state (and ZeRO-2 the gradients) of the *trainable* parameters over
    the ranks; the frozen base model is replicated either way. For LoRA that state is small (an 8B model
    at r=16: 42M parameters, 0.5 GB of fp32 gradients and Adam moments), so partitioning saves little
    memory while DeepSpeed's per-parameter work costs every step (measured in launch/results/)."""
    stage = int((ds or {}).get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2) or cfg.zero12 == "deepspeed":
        return None
    if cfg.zero12 == "ddp":
        return "distributed.zero12=ddp"
    zero = ds["zero_optimization"]
    offloaded = [k for k in ("offload_optimizer", "offload_param")
                 if str((zero.get(k) or {}).get("device", "none")).lower() not in ("none", "")]
    if offloaded:
        return None  # the JSON moves state to the CPU: that saving is DeepSpeed's to make
    if trainable_numel is None:
        return None
    saving = 12 * trainable_numel * (1 - 1 / max(1, world))  # fp32 gradient + two Adam moments, partitioned
    if saving >= ZERO12_DDP_MAX_SAVING:
        return None
    return (f"ZeRO-{stage} would partition only the trainable state ({trainable_numel:,} parameters: "
            f"{saving / 2**30:.2f} GiB saved per GPU at {world} GPU(s)); the base model is replicated either way")


def set_default_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created without one of its own. The world group
    gets it from `init_process_group`, but DeepSpeed clones the world group for its collectives
    (`deepspeed.utils.groups._clone_world_group`: `dist.new_group(ranks)` through
    `deepspeed.comm.torch.TorchBackend.new_group`, which passes no timeout) and ZeRO's gradient reduction,
    gradient norm and parameter gathers all run on that clone; torch then gives it its backend's default,
    30 minutes for gloo, so a frozen rank hung ZeRO-2 for half an hour instead of
    `distributed.timeout_minutes`. torch reads the default from these module attributes at each `new_group`
    (`distributed_c10d._get_default_timeout`): setting them reaches every group any library creates later."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:  # None in a build without NCCL
        c10d.default_pg_nccl_timeout = timeout


def build_accelerator(cfg: DistributedConfig, *, model_dtype: str, as_ddp: bool = False):
    """The Accelerator for this launch. `model_dtype`: `model.dtype` (DeepSpeed's precision is the model's);
    `as_ddp`: a ZeRO-1/2 launch runs as DDP (`zero12_as_ddp`)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    timeout = timedelta(minutes=cfg.timeout_minutes)
    set_default_timeout(timeout)  # before any group exists: DeepSpeed's clones inherit it
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if as_ddp:  # `accelerate launch` with a DeepSpeed YAML said DeepSpeed in the environment
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    use_deepspeed = not as_ddp and (bool(cfg.deepspeed_config) or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"))
    if launched_world > 1 and not torch.cuda.is_available():
        # Accelerate 1.15 on a machine with no GPU does not see a torchrun launch as distributed: its
        # state says one process (DistributedType.NO), `reduce` does nothing, nothing is wrapped in DDP,
        # and every rank trains alone (under DeepSpeed: `train_batch_size ... 2 != 2 * 1 * 2`). Create
        # the shared state first: gloo for DeepSpeed (cpu=True would disable the DeepSpeed path), and
        # cpu=True otherwise, which is what makes accelerate choose MULTI_CPU (DDP over gloo).
        if use_deepspeed:
            PartialState(backend="gloo", timeout=timeout)
        else:
            PartialState(cpu=True, backend="gloo", timeout=timeout)
    plugin = None
    if use_deepspeed and cfg.deepspeed_config:
        plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed_config)
    # Without DeepSpeed the precision is the model's too: no autocast, whatever the launcher's YAML says.
    extra = {"mixed_precision": "no"} if as_ddp else {}
    if use_deepspeed:
        # DeepSpeed's precision is the model's (model.dtype). Accelerate writes its own mixed_precision
        # ("no" unless an accelerate config says otherwise) into the JSON's "auto" bf16/fp16 sections as
        # it starts, before the model is built; ZeRO-3's zero.Init then casts a bf16 model to fp32, and
        # ZeRO-1/2 meet a bf16 model with bf16 disabled. Give it the model's precision instead.
        dtype = resolve_dtype(model_dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        extra["mixed_precision"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # Gradient accumulation is ours (loss.py): accelerate must not divide the loss by it again.
    accelerator = Accelerator(gradient_accumulation_steps=1, deepspeed_plugin=plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)], **extra)
    if accelerator.num_processes != launched_world:
        raise RuntimeError(
            f"the launcher started {launched_world} processes but accelerate sees {accelerator.num_processes}: "
            "every rank would train alone. Launch with `accelerate launch` or `torchrun`, not both nested."
        )
    return accelerator


def start_accelerator(cfg: DistributedConfig, *, model_dtype: str, trainable_numel: Callable[[], int]):
    """The accelerator for this launch and how it runs: (accelerator, the ZeRO stage asked for, why a ZeRO-1/2
    launch runs as DDP, or None). ZeRO-1/2 with a small trainable state run as DDP (`zero12_as_ddp`):
    decided before the process group exists, from `trainable_numel()` (counted on a meta-device skeleton,
    `model.trainable_numel_on_meta`), called only where the decision needs it."""
    ds = requested_deepspeed(cfg)
    stage = int((ds or {}).get("zero_optimization", {}).get("stage", 0))
    numel = trainable_numel() if stage in (1, 2) and cfg.zero12 == "auto" else None
    as_ddp = zero12_as_ddp(cfg, ds, numel, int(os.environ.get("WORLD_SIZE", "1")))
    return build_accelerator(cfg, model_dtype=model_dtype, as_ddp=as_ddp is not None), stage, as_ddp


def zero_stage(accelerator) -> int:
    if accelerator.distributed_type != "DEEPSPEED":
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def configure_deepspeed(accelerator, *, micro_batch: int, accum: int, max_grad_norm: float,
                        dtype: torch.dtype) -> None:
    """Fill the values the trainer owns into the DeepSpeed config before `prepare` (they are "auto"
    in ds_configs/; a value written there explicitly must agree)."""
    if accelerator.distributed_type != "DEEPSPEED":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro_batch * accum * accelerator.num_processes,
        "gradient_clipping": float(max_grad_norm),
    }
    for key, value in ours.items():  # check everything before changing anything
        current = ds.get(key, "auto")
        if current not in ("auto", None) and current != value:
            raise ValueError(
                f"DeepSpeed config sets {key}={current}, but the trainer's settings give {value}: set it to "
                f'"auto" in the JSON (the trainer owns it) or change the train.* setting'
            )
    ds.update(ours)
    # Precision is the model's (model.dtype): DeepSpeed keeps fp32 master weights for bf16/fp16 ones.
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif bool(section["enabled"]) != wanted:
            raise ValueError(f"DeepSpeed config has {key}.enabled={section['enabled']} but model.dtype is {dtype}")
    # DeepSpeed's throughput timer (on by default) synchronizes the device at the start of every forward and
    # at every step, for a samples/s line printed every `steps_per_print` steps; the trainer times its steps
    # itself (perf/*), so it is off unless the JSON has a "timers" section.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    # The trainer steps its own schedule and passes its own torch optimizer.
    for key in ("scheduler", "optimizer"):
        if key in ds:
            raise ValueError(f"remove the {key!r} section from the DeepSpeed config: distsft provides its own")


ZERO3_PERSISTENCE_CAP = 10_000_000
"""Largest trainable tensor (elements) kept whole on every rank under ZeRO-3 (`prepare_zero3`)."""


def _output_requires_grad(module, inputs, output):
    return output.requires_grad_(True)


def prepare_zero3(accelerator, model: torch.nn.Module, layers, embeddings: torch.nn.Module, gather: str) -> dict:
    """Before `accelerator.prepare` under ZeRO-3 (a no-op otherwise): how DeepSpeed gathers the model.

    `gather="layer"` (`distributed.zero3_gather`): every decoder layer becomes a DeepSpeed leaf module. Its
    pre-forward hook gathers all of the layer's parameters at once (and its pre-backward hook again for
    the backward, recomputation included), and no hook is put on the modules inside it, so the fused LoRA
    projections, which read `base_layer.weight` without calling `base_layer`, see whole weights, and
    DeepSpeed's trace-based prefetch moves one layer at a time. Then the values the JSON leaves "auto"
    are sized to it: the next layer may be prefetched whole while this one computes
    (`stage3_prefetch_bucket_size` one layer, `stage3_max_live_parameters` / `stage3_max_reuse_distance`
    three), and the LoRA tensors stay whole on every rank (`stage3_param_persistence_threshold` the
    largest trainable tensor, at most ZERO3_PERSISTENCE_CAP elements): adapter-sized, never gathered.
    Returns the values it filled in.

    DeepSpeed reduces a leaf module's gradients in a full backward hook on it, which fires when the
    gradient with respect to the module's inputs is complete; when no input requires grad (the first
    layer: the frozen embedding's output) it fires as soon as the output's gradient arrives, before the
    layer's own parameter gradients exist, and reduces zeros for them (the late gradient then fails to
    accumulate into the released parameter). So the embedding's output is made to require grad (as
    transformers' `enable_input_require_grads` does): the first layer then behaves like every other,
    at the cost of one (tokens, hidden) gradient that nothing reads.

    DeepSpeed also walks the parameter tree of every leaf layer in each fetch, release and gradient hook,
    and of the whole model twice per optimizer step: `model` and each layer list their parameters once
    (`zero3_host.walk_once`; their trees are fixed from here on: merging is refused under ZeRO-3)."""
    if zero_stage(accelerator) != 3:
        return {}
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})

    def numel(p) -> int:
        return int(getattr(p, "ds_numel", p.numel()))  # under zero.Init the local tensor is empty

    filled = {}
    if gather == "layer":
        for layer in (*layers, model):
            walk_once(layer, "named_parameters")
        for layer in layers:
            layer._z3_leaf = True  # deepspeed.utils.set_z3_leaf_module (DeepSpeed reads this flag)
        embeddings.register_forward_hook(_output_requires_grad)
        layer_numel = max(sum(numel(p) for p in layer.parameters()) for layer in layers)
        wanted = {"stage3_prefetch_bucket_size": layer_numel,
                  "stage3_max_live_parameters": max(10**9, 3 * layer_numel),
                  "stage3_max_reuse_distance": max(10**9, 3 * layer_numel)}
        largest = max((numel(p) for p in model.parameters() if p.requires_grad), default=0)
        if largest <= ZERO3_PERSISTENCE_CAP:
            wanted["stage3_param_persistence_threshold"] = largest
        for key, value in wanted.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = filled[key] = int(value)
    logger.info("ZeRO-3: gathering %s%s", "whole decoder layers (leaf modules)" if gather == "layer"
                else "per module (DeepSpeed's default)", f"; filled in {filled}" if filled else "")
    return filled


def register_head_for_zero3(wrapper, accelerator_or_none=None) -> None:
    """ZeRO-3 gathers a module's parameters around that module's own forward. The loss wrapper reads
    `lm_head.weight` without calling `lm_head`, so register it as an external parameter of the wrapper:
    then it is gathered around the wrapper's forward, where the fused linear cross-entropy runs."""
    head = wrapper.lm_head()
    if hasattr(head.weight, "ds_id"):
        import deepspeed

        deepspeed.zero.register_external_parameter(wrapper, head.weight)
        if head.bias is not None:
            deepspeed.zero.register_external_parameter(wrapper, head.bias)


class StepBackend:
    """One optimizer step's backward and update, called the same way in every mode, so that the loop never
    asks which: under DeepSpeed the engine (the prepared model) runs backward, clipping and the step itself;
    under DDP and in one process accelerate runs backward and clipping, and the optimizer steps."""

    def __init__(self, accelerator, model, optimizer, *, accum: int, max_grad_norm: float):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.engine = model if accelerator.distributed_type == "DEEPSPEED" else None
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.divides_by = accum if self.engine is not None else 1
        """What the backend divides each backward by on its own (`loss.backward_scale`'s `engine_divides_by`):
        DeepSpeed's engine divides by its gradient accumulation steps."""

    def no_sync(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are reduced after the step's `last` one
        only (DDP: no all-reduce before it; DeepSpeed: told which backward ends the step, it then reduces)."""
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        (self.engine.backward if self.engine is not None else self.accelerator.backward)(loss)

    def clip_and_step(self, read_loss) -> tuple[float, float]:
        """Clip the gradients to `train.max_grad_norm` and update the weights unless the step's loss or the
        global gradient norm is non-finite; returns (that norm before clipping, the loss). `read_loss()`
        gives the step's global loss (a collective that waits for the GPU). Under DeepSpeed the engine
        clips (gradient_clipping) and steps inside `engine.step()`, where its overflow check skips the
        update when the gradients are non-finite, on every rank; it does not read the loss, so the loss
        is read after the step, and the start of the step (DeepSpeed's release of every parameter, the
        launch of its norm, up to its own check of the norm) runs on the host while the GPU finishes the
        backward instead of after it."""
        if self.engine is not None:
            self.engine.step()
            return float(self.engine.get_global_grad_norm() or 0.0), read_loss()
        loss = read_loss()
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_norm))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        return grad_norm, loss


def prepare_for_mode(accelerator, model, optimizer, *, layers, dtype: torch.dtype, micro_batch: int, accum: int,
                     max_grad_norm: float, zero3_gather: str, zero3_fast_paths: bool = True) -> tuple:
    """`accelerator.prepare` for this launch's mode: first the DeepSpeed config filled in (`configure_deepspeed`)
    and ZeRO-3's gathering set up (`prepare_zero3`), after it the LM head registered with ZeRO-3. `model`:
    the loss wrapper (`CausalLMWithLoss`), `layers` its decoder layers, `dtype` its compute dtype. Returns
    (prepared model, prepared optimizer, their `StepBackend`, the ZeRO-3 values filled in)."""
    configure_deepspeed(accelerator, micro_batch=micro_batch, accum=accum, max_grad_norm=max_grad_norm, dtype=dtype)
    filled = prepare_zero3(accelerator, model, layers, model.causal_lm.get_input_embeddings(), zero3_gather)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_head_for_zero3(accelerator.unwrap_model(model))
    backend = StepBackend(accelerator, model, optimizer, accum=accum, max_grad_norm=max_grad_norm)
    if zero_stage(accelerator) == 3:
        fast = speed_up_zero3(backend.engine, zero3_fast_paths)
        logger.info("ZeRO-3 host fast paths: %s", "; ".join(fast) if fast else
                    "off (distributed.zero3_fast_paths=false)" if not zero3_fast_paths else
                    f"none applied (optimizer {type(getattr(backend.engine, 'optimizer', None)).__name__})")
        filled = {**filled, "fast_paths": fast}
    return model, optimizer, backend, filled


@contextlib.contextmanager
def gathered_parameters(params: list[torch.nn.Parameter]):
    """Make ZeRO-3-partitioned parameters whole inside the block (a collective: every rank enters)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def sample_digest(indices: list[int]) -> int:
    """An order-free digest of a set of sample indices: summed over ranks it names the samples of an
    optimizer step independently of the world size (tests compare it across modes)."""
    return sum((i * 2654435761 + 97) % 1_000_003 for i in indices)
