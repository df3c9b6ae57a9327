"""SwiGLU and GeGLU kernels against `F.silu(gate) * up` and `F.gelu(gate, approximate="tanh") * up`."""

import pytest
import torch
from distsft_kernels import gated_activation, geglu, geglu_ref, swiglu, swiglu_ref
from kernel_tolerances import check_against_reference

SHAPES = [(7, 123), (4, 256), (2, 3, 1000)]
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp, interpreter
OPS = {"swiglu": (swiglu, swiglu_ref), "geglu": (geglu, geglu_ref)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("shape", SHAPES)
def test_glu_matches_reference(shape, op, dtype, device):
    gate = torch.randn(shape, device=device) * 3  # covers both tails of the activation
    up = torch.randn(shape, device=device)
    kern, ref = OPS[op]
    check_against_reference(op, kern, ref, [gate, up], dtype)


def test_glu_rejects_mismatched_shapes(device):
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3, device=device), torch.randn(3, 2, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_glu_llama3_8b_shape(op, cuda):
    gate = torch.randn(16384, 14336, device=cuda) * 3
    up = torch.randn(16384, 14336, device=cuda)
    kern, ref = OPS[op]
    check_against_reference(op, kern, ref, [gate, up], torch.bfloat16)


@pytest.mark.parametrize("op", ["silu", "gelu_tanh"])
def test_inplace_grads_match_and_guard(op, device):
    """`inplace_grads=True` (the patched MLP's mode) gives the same gradients, in gate's and up's memory."""
    gate, up = torch.randn(5, 77, device=device), torch.randn(5, 77, device=device)
    dy = torch.randn(5, 77, device=device)
    grads = []
    for inplace in (False, True):
        g0, u0 = gate.clone().requires_grad_(), up.clone().requires_grad_()
        g, u = g0 * 1, u0 * 1  # non-leaves the op may overwrite
        y = gated_activation(g, u, op, inplace_grads=inplace)
        (y * dy).sum().backward()
        grads.append((g0.grad, u0.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    x = torch.randn(5, 77, device=device, requires_grad=True)
    g = torch.sigmoid(x)  # saves its output, which the backward would overwrite: must fail loudly
    y = gated_activation(g, torch.randn(5, 77, device=device), op, inplace_grads=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
