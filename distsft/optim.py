"""Optimizer and learning-rate schedule for the trainable (LoRA) parameters."""

from __future__ import annotations

import math

import torch
from torch import nn

from distsft.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (LoRA A/B, full modules_to_save weights); never biases or norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not groups[0]["params"] and len(groups) == 1:
        raise ValueError("the model has no trainable parameters: check lora.target_modules")
    common = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optim == "adamw_8bit":
        if device.type != "cuda":
            raise ValueError("train.optim=adamw_8bit needs a CUDA GPU (bitsandbytes); use adamw_torch on CPU")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    # Fused AdamW is one kernel for all parameters on CUDA; on CPU the foreach path is the fast one, and the
    # fused one (torch's CPU kernel) is there on request: the tests run ZeRO-3's on-device skip of a step
    # with non-finite gradients (distsft/zero3_host.py), which needs a fused optimizer, on CPU processes.
    fused = device.type == "cuda" or cfg.optim == "adamw_torch_fused"
    return torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True, **common)


def schedule_length(cfg: TrainConfig, sequences: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, the run's optimizer steps) over a training set of `sequences` packed
    sequences on `world_size` processes; a ValueError when it holds fewer than one global batch."""
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_batch = micro * accum * world_size
    steps_per_epoch = sequences // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.per_device_train_batch_size: the training set packs into {sequences} sequences, "
            f"fewer than one global batch of {global_batch} (train.per_device_train_batch_size {micro} x "
            f"train.gradient_accumulation_steps {accum} x {world_size} processes); lower them or add data"
        )
    return steps_per_epoch, cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )
