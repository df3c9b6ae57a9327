"""The dtype a `model.dtype` name means on a device (below every room that needs it: the accelerator's
precision is chosen before the model exists)."""

from __future__ import annotations

import torch


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, else float32; any other name is torch's dtype of it."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)
