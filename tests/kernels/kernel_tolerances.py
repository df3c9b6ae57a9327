"""The one tolerance table of the kernel tests, and the comparison rule.

Every output and every gradient of a kernel is compared with two runs of the PyTorch reference on the
same inputs: `high` (one precision up: bf16 inputs computed in fp32, fp32 inputs in fp64) as the ground
truth, and `same` (the reference in the kernel's own dtype, i.e. what HF would compute). The rule is
flash-attention's, on absolute errors (never a signed difference):

    max|kernel - high| <= 2 * max|same - high| + FLOOR[dtype] * max|high|

The floor is relative to the tensor's scale (a sum over 10^5 vocab entries is not an O(1) number) and
is a fraction of one ulp of the dtype, so it only matters where the reference happens to be exact.
"""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the kernel tests run: the GPU when there is one, else the CPU under Triton's interpreter."""

FLOOR = {
    torch.float32: 2e-6,  # ~16 fp32 ulps at the tensor's largest magnitude
    torch.bfloat16: 2e-3,  # ~1/4 bf16 ulp at the tensor's largest magnitude
}
"""Relative floor per compute dtype."""

MODEL_RTOL = {
    torch.float32: 2e-5,
}
"""Whole tiny models in fp32 (patched vs HF): max|a - b| <= MODEL_RTOL * max|b|, for logits, loss,
every LoRA gradient and each of the 20 losses of a training curve."""

HIGH = {torch.float32: torch.float64, torch.bfloat16: torch.float32}
"""The ground truth's dtype for each tested dtype."""


def assert_close_to_reference(name: str, kernel: torch.Tensor, same: torch.Tensor, high: torch.Tensor) -> None:
    """The rule above; `kernel`'s dtype picks the floor. Non-finite values always fail."""
    assert kernel.shape == high.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(high.shape)}"
    k, s, h = (t.detach().to(torch.float64) for t in (kernel, same, high))
    assert torch.isfinite(k).all(), f"{name}: non-finite values in the kernel's result"
    errors = [(k - h).abs().max().item(), (s - h).abs().max().item(), h.abs().max().item()] if k.numel() else [0.0] * 3
    assert_errors(name, kernel.dtype, *errors)


def assert_errors(name: str, dtype: torch.dtype, err_kernel: float, err_torch: float, scale: float) -> None:
    """The rule on precomputed maxima (for references evaluated in pieces, e.g. row chunks of 16K x 128K)."""
    bound = 2 * err_torch + FLOOR[dtype] * scale
    assert err_kernel <= bound, (
        f"{name} ({dtype}): max|kernel - ref| = {err_kernel:.3g} > {bound:.3g} "
        f"(torch same-dtype error {err_torch:.3g}, scale {scale:.3g})"
    )


def assert_model_close(name: str, a: torch.Tensor, b: torch.Tensor, dtype=torch.float32) -> None:
    a, b = a.detach().double(), b.detach().double()
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    bound = MODEL_RTOL[dtype] * scale
    assert err <= bound, f"{name}: max|patched - HF| = {err:.3g} > {MODEL_RTOL[dtype]} * {scale:.3g}"


def run_fn(fn, inputs, dtype, grad_out=None, requires_grad=None):
    """Run `fn(*inputs cast to dtype)` with gradients: returns (outputs, input grads).

    Floating inputs are cast to `dtype` and made leaves (those with requires_grad False in
    `requires_grad` stay frozen); `grad_out` (list, one per floating output) is the cotangent.
    """
    leaves = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().to(dtype).clone()
            x.requires_grad_(True if requires_grad is None else requires_grad[i])
        leaves.append(x)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    float_outs = [o for o in outs if o.is_floating_point()]
    if grad_out is None:
        grad_out = [torch.randn_like(o, dtype=torch.float64) for o in float_outs]
    pairs = zip(float_outs, grad_out, strict=True)
    loss = sum((o.to(torch.float64) * g.to(o.dtype).to(torch.float64)).sum() for o, g in pairs)
    wrt = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, wrt) if wrt else ()
    return outs, list(grads), grad_out


def check_against_reference(name, kernel_fn, ref_fn, inputs, dtype, requires_grad=None):
    """Kernel vs reference (same dtype) vs reference (one precision up): every output and gradient."""
    k_out, k_grads, g = run_fn(kernel_fn, inputs, dtype, requires_grad=requires_grad)
    s_out, s_grads, _ = run_fn(ref_fn, inputs, dtype, g, requires_grad)
    h_out, h_grads, _ = run_fn(ref_fn, inputs, HIGH[dtype], g, requires_grad)
    for i, (k, s, h) in enumerate(zip(k_out, s_out, h_out, strict=True)):
        if k.is_floating_point():
            assert k.dtype == s.dtype, f"{name} output {i}: dtype {k.dtype}, HF gives {s.dtype}"
            assert_close_to_reference(f"{name} output {i}", k, s, h)
        else:
            assert torch.equal(k, s), f"{name} output {i}: {k} != {s}"
    assert len(k_grads) == len(h_grads)
    for i, (k, s, h) in enumerate(zip(k_grads, s_grads, h_grads, strict=True)):
        assert k.dtype == s.dtype, f"{name} grad {i}: dtype {k.dtype}, torch gives {s.dtype}"
        assert_close_to_reference(f"{name} grad {i}", k, s, h)
    return k_out, k_grads
