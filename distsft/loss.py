"""Token-normalised loss across micro-batches and ranks (DESIGN.md rule 9), in one place.

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

import torch


def backward_scale(global_tokens: int, world_size: int, engine_divides_by: int = 1) -> float:
    """Factor that turns a micro-batch's summed loss into its share of the global token mean.

    `engine_divides_by`: what the backend divides each backward by on its own (DeepSpeed: its
    gradient_accumulation_steps; DDP and single process: 1).
    """
    if global_tokens <= 0:
        raise ValueError("an optimizer step with no target tokens: every micro-batch is fully masked")
    return world_size * engine_divides_by / global_tokens


def count_targets(micro_batches: list[dict[str, torch.Tensor]], ignore_index: int = -100) -> int:
    return int(sum(int(mb["target_ids"].ne(ignore_index).sum()) for mb in micro_batches))
