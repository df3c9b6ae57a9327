"""The loss, in one room: the ignore index, the LM-head loss choice, and token normalisation across
micro-batches and ranks (DESIGN.md rule 9).

    loss_fn = select_loss_fn(cfg.kernels)   # (hidden, weight, targets, *, bias, softcap) -> (sum, n)

Targets are shifted by the data pipeline (`target_ids[t]` is the token after t, IGNORE_INDEX where
nothing is trained), never in the model. `CausalLMWithLoss` (distsft/model.py) sends only the positions
with a target (`target_indices`) to the LM head and `loss_fn`.

An optimizer step sees K micro-batches on each of W ranks. The objective is the mean over every target
token of the step, wherever it lives:

    L = sum_{r, k} S_{r,k} / T,        S_{r,k} = summed token loss of micro-batch k on rank r,
                                       T       = sum_{r, k} n_{r,k}, the global count of target tokens.

Each rank back-propagates `S_{r,k} * backward_scale(...)`. DDP and DeepSpeed both average gradients over
the W ranks (a factor 1/W we undo), and DeepSpeed's engine also divides every backward by its configured
gradient-accumulation steps (a factor 1/K we undo), so the summed gradient is exactly dL/dθ. Dividing
per micro-batch by its own count instead (the common bug) weights a token by the length of its
neighbours, and makes one rank and two ranks disagree on identical data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distsft.config import KernelsConfig

IGNORE_INDEX = -100
"""The target of a position that trains nothing (masked prompt, padding, a document's last token)."""

# (hidden (N, d), weight (V, d), targets (N,), *, bias, softcap) -> (loss_sum fp32, n_valid int64)
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def select_loss_fn(cfg: KernelsConfig) -> LossFn:
    """The LM-head + loss function for `cfg`:

        loss_fn(hidden (N, d), weight (V, d), targets (N,), *, bias=None, softcap=None,
                ignore_index=IGNORE_INDEX, label_smoothing=0.0) -> (loss_sum fp32, n_valid int64)

    targets are already shifted. Fused linear CE when `cfg.fused_linear_cross_entropy`, else logits +
    our CE kernel when `cfg.cross_entropy`, else the reference (logits in the input dtype, fp32 CE: HF's
    numerics); Triton or reference per call (`cfg.backend`), noted in the kernel census.
    """
    # The kernels load here, when a model is built, not when this module is imported: the data pipeline
    # imports IGNORE_INDEX from here and has no use for Triton.
    import distsft_kernels as K
    import torch.nn.functional as F
    from distsft_kernels.reference import fused_linear_cross_entropy_ref

    from distsft import census

    kind = "fused_linear_ce" if cfg.fused_linear_cross_entropy else "ce" if cfg.cross_entropy else "reference"
    backend = cfg.backend

    def loss_fn(hidden, weight, targets, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                label_smoothing=0.0):
        kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap)
        triton = kind != "reference" and census.use_triton(backend, hidden)
        census.note("loss", f"{kind} (triton)" if triton else "reference (torch)", "lm_head")
        if triton:
            if kind == "fused_linear_ce":
                return K.fused_linear_cross_entropy(hidden, weight, targets, bias=bias, **kw)
            logits = F.linear(hidden, weight, bias)  # (N, V) in the input dtype; ours, so CE may overwrite it
            return K.cross_entropy(logits, targets, inplace=True, **kw)
        return fused_linear_cross_entropy_ref(hidden, weight, targets, bias=bias, **kw)

    loss_fn.__name__ = loss_fn.__qualname__ = f"loss_fn[{kind}, backend={backend}]"
    return loss_fn


def target_indices(target_ids: torch.Tensor) -> torch.Tensor:
    """The flat (B*T) positions that have a target (label != IGNORE_INDEX), int64, on target_ids' device."""
    return target_ids.reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)


def backward_scale(global_tokens: int, world_size: int, engine_divides_by: int = 1) -> float:
    """Factor that turns a micro-batch's summed loss into its share of the global token mean.

    `engine_divides_by`: what the backend divides each backward by on its own (DeepSpeed: its
    gradient_accumulation_steps; DDP and single process: 1).
    """
    if global_tokens <= 0:
        raise ValueError("an optimizer step with no target tokens: every micro-batch is fully masked")
    return world_size * engine_divides_by / global_tokens


def count_targets(micro_batches: list[dict[str, torch.Tensor]], ignore_index: int = IGNORE_INDEX) -> int:
    return int(sum(int(mb["target_ids"].ne(ignore_index).sum()) for mb in micro_batches))
