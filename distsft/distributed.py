"""Process groups, DeepSpeed plumbing and preemption: what the loop needs to run the same on 1 process,
DDP, and DeepSpeed ZeRO-1/2/3 (with or without CPU offload).

The mode comes from the launcher: `accelerate launch --config_file accelerate_configs/<mode>.yaml`, or
`torchrun` with `distributed.deepspeed_config=ds_configs/zeroN.json` in the run config (both end up in
an Accelerator with a DeepSpeedPlugin). Batch sizes, accumulation and clipping are the trainer's: the
DeepSpeed JSON says "auto" for them and `configure_deepspeed` fills them in before `prepare`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from datetime import timedelta

import torch

from distsft.config import Config

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, checkpoint committed, run me again"
NONRETRYABLE_EXIT_CODE = 65  # EX_DATAERR: diverged (non-finite losses); retrying would do the same


def write_exit_status(reason: str, exit_code: int, step: int | None = None) -> None:
    """For launchers that only see torchrun's exit code (any failed worker makes it 1): the file named by
    DISTSFT_STATUS_FILE (set by launch/multinode.sh and launch/slurm.sbatch) gets the real reason."""
    path = os.environ.get("DISTSFT_STATUS_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"reason": reason, "exit_code": exit_code, "step": step}, f)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the command line exits with NONRETRYABLE_EXIT_CODE."""


def build_accelerator(cfg: Config):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    timeout = timedelta(minutes=cfg.distributed.timeout_minutes)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    use_deepspeed = bool(cfg.distributed.deepspeed_config) or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")
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
    if cfg.distributed.deepspeed_config:
        plugin = DeepSpeedPlugin(hf_ds_config=cfg.distributed.deepspeed_config)
    extra = {}
    if use_deepspeed:
        # DeepSpeed's precision is the model's (model.dtype). Accelerate writes its own mixed_precision
        # ("no" unless an accelerate config says otherwise) into the JSON's "auto" bf16/fp16 sections as
        # it starts, before the model is built; ZeRO-3's zero.Init then casts a bf16 model to fp32, and
        # ZeRO-1/2 meet a bf16 model with bf16 disabled. Give it the model's precision instead.
        from distsft.model import resolve_dtype

        dtype = resolve_dtype(cfg.model.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
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


def deepspeed_engine(accelerator, model):
    """The DeepSpeedEngine when running under DeepSpeed, else None."""
    return model if accelerator.distributed_type == "DEEPSPEED" else None


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
    # The trainer steps its own schedule and passes its own torch optimizer.
    for key in ("scheduler", "optimizer"):
        if key in ds:
            raise ValueError(f"remove the {key!r} section from the DeepSpeed config: distsft provides its own")


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


@contextlib.contextmanager
def gathered_parameters(params: list[torch.nn.Parameter]):
    """Make ZeRO-3-partitioned parameters whole inside the block (a collective: every rank enters)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def injected_fault(name: str, step: int, rank: int) -> bool:
    """Test hook: DISTSFT_TEST_FAULT="<name>@<step>@<rank>" makes `name` happen there (the multi-process
    tests kill a rank inside a save, or feed it a NaN loss). Never set in real runs."""
    spec = os.environ.get("DISTSFT_TEST_FAULT", "")
    return bool(spec) and spec == f"{name}@{step}@{rank}"


def sample_digest(indices: list[int]) -> int:
    """An order-free digest of a set of sample indices: summed over ranks it names the samples of an
    optimizer step independently of the world size (tests compare it across modes)."""
    return sum((i * 2654435761 + 97) % 1_000_003 for i in indices)


# ----------------------------------------------------------------------------------------------------
# Preemption


class PreemptionFlag:
    """SIGTERM and SIGUSR1 only set a flag (a handler must not do I/O or collectives); the loop asks
    `agreed()` at every step boundary, which all-reduces it so that every rank stops at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            logger.warning("received %s: will save a checkpoint and exit at the next step boundary",
                           signal.Signals(signum).name)
        # A second signal changes nothing: one save, then exit.

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was signalled (a collective: every rank calls it)."""
        local = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(local, "max").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
