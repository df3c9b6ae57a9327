"""Gated MLP activations, fused forward and backward: SwiGLU `silu(gate) * up` and GeGLU
`gelu_tanh(gate) * up` (HF `gelu_pytorch_tanh`, Gemma).

Forward (elementwise, fp32 arithmetic, one rounding to the output dtype):
    silu(g)  = g * sigmoid(g)
    gelu(g)  = 0.5 * g * (1 + tanh(u)),  u = sqrt(2/pi) * (g + 0.044715 g^3)
    y        = act(g) * up
Backward:
    d up     = dy * act(g)
    d gate   = dy * up * act'(g)
    silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    gelu'(g) = 0.5 * (1 + tanh(u)) + 0.5 * g * (1 - tanh(u)^2) * sqrt(2/pi) * (1 + 3 * 0.044715 g^2)

Shapes: gate, up (..., I), same shape; y the same. Dtypes: y in promote(gate, up) (HF: bf16 act then
bf16 product; here one fp32 computation, rounded once). Saved for backward: gate and up (act(g) is
recomputed, which is cheaper than storing it). The backward writes new gradient tensors, or with
`inplace_grads` overwrites gate and up (bumping their version counters, so a tensor saved elsewhere fails
loudly instead of being read overwritten).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, Launcher, cast_out, cdiv


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32. ACT 0: silu, 1: gelu (tanh approximation)."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    else:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 * tl.sigmoid(2.0 * u))  # 1 + tanh(u) = 2 sigmoid(2u)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    else:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), portable across Triton versions
        da = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return 0.5 * g * (1.0 + th), da


@triton.jit
def _glu_fwd_kernel(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast_out(_act(g, ACT) * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DY, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DG + offs, cast_out(dy * u * da, DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, cast_out(dy * a, DU.dtype.element_ty), mask=mask)


_ACTS = {"silu": 0, "gelu_tanh": 1}


def _launch_cfg(n: int) -> tuple[int, int]:
    block = 65536 if INTERPRETED else 1024
    return block, cdiv(n, block)


_launch_fwd, _launch_bwd = Launcher(_glu_fwd_kernel), Launcher(_glu_bwd_kernel)


def glu_forward(gate, up, act: int):
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    block, grid = _launch_cfg(gate.numel())
    _launch_fwd((grid,), gate, up, y, gate.numel(), ACT=act, BLOCK=block, num_warps=4)
    return y, gate, up


def glu_backward(dy, gate, up, act: int, inplace: bool):
    dy = dy.contiguous()
    if inplace:  # the gradients overwrite the saved inputs (each element is read before it is written)
        dgate, dup = gate, up
        torch.autograd.graph.increment_version((gate, up))  # anything else that saved them now fails loudly
    else:
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    block, grid = _launch_cfg(gate.numel())
    _launch_bwd((grid,), dy, gate, up, dgate, dup, gate.numel(), ACT=act, BLOCK=block, num_warps=4)
    return dgate, dup


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, inplace):
        y, gate, up = glu_forward(gate, up, act)
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.inplace = act, inplace
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dy, gate, up, ctx.act, ctx.inplace)
        return dgate, dup, None, None


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *, inplace_grads: bool = False
) -> torch.Tensor:
    """`act(gate) * up` for activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU).

    `inplace_grads=True` writes the backward's gradients over gate and up (saves two (..., I) buffers);
    only for gate/up that nothing else reads, e.g. the projections' outputs inside an HF MLP forward.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if activation not in _ACTS:
        raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return glu_forward(gate, up, _ACTS[activation])[0]  # no node to record
    return GLUFunction.apply(gate, up, _ACTS[activation], bool(inplace_grads))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (Llama, Mistral, Qwen MLPs)."""
    return gated_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh(gate) * up` (Gemma MLPs)."""
    return gated_activation(gate, up, "gelu_tanh")
