"""Pure-PyTorch references for every kernel, reproducing the HF modules' numerics (where they cast).

Used by the tests (ground truth and "same dtype" error baseline), the benchmarks (the eager and
`torch.compile` providers) and the CPU fallback of `distsft.patching` (backend `torch`, or `auto`
where Triton cannot run). Each function has the same signature as its kernel's entry point.

Upcasting follows HF exactly for bf16/fp16/fp32 inputs ("compute in fp32"); float64 inputs stay in
float64, so the tests can build a higher-precision ground truth from the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    """HF's `.float()` / `.to(torch.float32)`, except that float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_ref(x, weight, eps: float = 1e-6, *, offset: float = 0.0, casting: str = "llama"):
    """HF LlamaRMSNorm (casting="llama", offset=0) and GemmaRMSNorm (casting="gemma", offset=1)."""
    input_dtype = x.dtype
    h = x.to(_acc(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (h * (offset + weight.to(h.dtype))).to(input_dtype)
    if casting != "llama":
        raise ValueError(f"casting must be 'llama' or 'gemma', got {casting!r}")
    w = weight if offset == 0.0 else offset + weight
    return w * h.to(input_dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q, k, cos, sin):
    """HF `apply_rotary_pos_emb` (unsqueeze_dim=1): q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B|1, T, D).
    Returns new tensors (the kernel rotates in place)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_ref(gate, up):
    """HF LlamaMLP's `act_fn(gate_proj(x)) * up_proj(x)` with act = silu."""
    return F.silu(gate) * up


def geglu_ref(gate, up):
    """The same with HF's `gelu_pytorch_tanh` (Gemma)."""
    return F.gelu(gate, approximate="tanh") * up


def cross_entropy_ref(logits, targets, *, ignore_index: int = -100, label_smoothing: float = 0.0, softcap=None):
    """(sum of token losses fp32, number of non-ignored targets int64): HF ForCausalLMLoss before dividing,
    on already-shifted targets. logits (N, V) any dtype, targets (N,)."""
    z = logits.to(_acc(logits.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    return loss, targets.ne(ignore_index).sum()


def fused_linear_cross_entropy_ref(
    hidden, weight, targets, *, bias=None, ignore_index: int = -100, label_smoothing: float = 0.0, softcap=None
):
    """Logits `hidden @ weight.T (+ bias)` in the input dtype, then `cross_entropy_ref`. hidden (N, d),
    weight (V, d), targets (N,) already shifted."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    return cross_entropy_ref(
        logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap
    )


def dequantize_4bit_ref(data, absmax, code, *, blocksize: int, shape, dtype, nested=None):
    """bitsandbytes' 4-bit dequantization (NF4 / FP4, optional double quantization) in plain PyTorch:
    fp32 products (the nested absmax and its offset rounded separately), one rounding to `dtype`."""
    n = 1
    for s in shape:
        n *= int(s)
    raw = (data.view(torch.uint8) if data.dtype != torch.uint8 else data).reshape(-1).to(torch.int64)
    nibbles = torch.stack((raw >> 4, raw & 15), dim=1).reshape(-1)[:n]  # element 2i: high nibble of byte i
    if nested is not None:
        absmax2, code2, blocksize2, offset = nested
        idx = torch.arange(absmax.numel(), device=absmax.device) // int(blocksize2)
        absmax = code2[absmax.reshape(-1).to(torch.int64)] * absmax2.reshape(-1)[idx]
        absmax = absmax + (offset if torch.is_tensor(offset) else torch.tensor(float(offset)))
    scale = absmax.reshape(-1).float()[torch.arange(n, device=raw.device) // blocksize]
    return (code.float()[nibbles] * scale).to(dtype).reshape(shape)
