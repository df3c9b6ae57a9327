"""distsft Triton kernels: the package `distsft_kernels`, in the repository's `kernels/` folder.

Functional entry points (each a `torch.autograd.Function` underneath) and their PyTorch references:

    rms_norm(x, weight, eps=1e-6, *, offset=0.0, casting="llama")          rms_norm_ref
    rope(q, k, cos, sin) -> (q, k)   (in place)                             rope_ref
    swiglu(gate, up), geglu(gate, up), gated_activation(gate, up, act)      swiglu_ref, geglu_ref
    cross_entropy(logits, targets, *, ignore_index, label_smoothing, softcap, inplace)
        -> (loss_sum, n_valid)                                              cross_entropy_ref
    fused_linear_cross_entropy(hidden, weight, targets, *, bias, ignore_index, label_smoothing, softcap)
        -> (loss_sum, n_valid)                                              fused_linear_cross_entropy_ref
    lora_projections(x, lora_a, lora_b, scalings, *, weights, biases)
        -> (y_1, ..., y_n)  (plain PyTorch GEMMs, no Triton)                lora_projections_ref
    dequantize_4bit(data, absmax, code, *, blocksize, shape, dtype, nested)
        (bitsandbytes NF4/FP4, bitwise equal; no autograd: frozen weights)  dequantize_4bit_ref
    dequantize_4bit_state(data, quant_state)   the same from a bitsandbytes QuantState
    Dequantizer(...) / Dequantizer.from_state(data, quant_state)
        the same, arguments checked once: each call is ~the launch
    cast.cast_concat(tensors, dtype)   cat of the flattened tensors, cast, in one launch (LoRA adapters)

Importing this package decorates the Triton kernels, which is when Triton decides between compiling
for a GPU and interpreting on CPU: set `TRITON_INTERPRET=1` before the first import to interpret.
`HAS_TRITON` is False where Triton is not installed; the references still work then.
"""

from __future__ import annotations

from .lora import lora_projections, lora_projections_ref  # cuBLAS, no Triton: runs everywhere
from .reference import (
    cross_entropy_ref,
    dequantize_4bit_ref,
    fused_linear_cross_entropy_ref,
    geglu_ref,
    rms_norm_ref,
    rope_ref,
    swiglu_ref,
)

try:
    from ._common import INTERPRETED, triton_can_run
    from .cross_entropy import cross_entropy
    from .dequant import Dequantizer, dequantize_4bit, dequantize_4bit_state
    from .fused_linear_cross_entropy import fused_linear_cross_entropy
    from .rms_norm import rms_norm
    from .rope import rope
    from .swiglu import gated_activation, geglu, swiglu

    HAS_TRITON = True
except ModuleNotFoundError as e:  # no triton on this platform: references only
    if e.name != "triton":
        raise
    HAS_TRITON = False
    INTERPRETED = False

    def triton_can_run(t) -> bool:
        return False


__all__ = [
    "HAS_TRITON",
    "INTERPRETED",
    "triton_can_run",
    "cross_entropy",
    "Dequantizer",
    "dequantize_4bit",
    "dequantize_4bit_state",
    "fused_linear_cross_entropy",
    "gated_activation",
    "geglu",
    "rms_norm",
    "rope",
    "swiglu",
    "lora_projections",
    "lora_projections_ref",
    "cross_entropy_ref",
    "dequantize_4bit_ref",
    "fused_linear_cross_entropy_ref",
    "geglu_ref",
    "rms_norm_ref",
    "rope_ref",
    "swiglu_ref",
]
