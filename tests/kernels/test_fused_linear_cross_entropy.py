"""Fused linear cross-entropy against `F.linear` + `cross_entropy_ref`: loss sum, count, grad of hidden,
and of weight and bias when trainable; several chunks; ignore_index, smoothing, soft-capping."""

import pytest
import torch
from distsft_kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from kernel_tolerances import check_against_reference

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp, interpreter

# (tokens, d, vocab), run in chunks of 4 tokens. CPU BLAS reduces a (<4, 128256) @ (128256, d) product
# sequentially (~1e-5 relative error in fp32, 10x its blocked kernels): the 128K-vocab case uses whole
# chunks so that the fp32 comparison measures our kernel, not that.
SHAPES = [(13, 32, 123), (8, 64, 128256)]


def _inputs(n, d, vocab, device, bias):
    hidden = torch.randn(n, d, device=device)
    weight = torch.randn(vocab, d, device=device) / d**0.5 * 3
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[::4] = -100
    return [hidden, weight, torch.randn(vocab, device=device) if bias else None], targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["frozen", "trainable", "trainable+bias"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flce_matches_reference(shape, head, dtype, device):
    (hidden, weight, bias), targets = _inputs(*shape, device, bias=head.endswith("bias"))
    kw = dict(label_smoothing=0.05, softcap=30.0) if head == "trainable+bias" else {}
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    frozen = head == "frozen"
    check_against_reference(
        f"flce[{head}]",
        lambda h, w, b=None: fused_linear_cross_entropy(h, w, targets, bias=b, chunk_size=4, **kw),
        lambda h, w, b=None: fused_linear_cross_entropy_ref(h, w, targets, bias=b, **kw),
        inputs, dtype, requires_grad=[True, not frozen, True],
    )


def test_flce_no_grad_and_empty(device):
    (hidden, weight, _), targets = _inputs(5, 16, 40, device, bias=False)
    with torch.no_grad():
        loss, n = fused_linear_cross_entropy(hidden, weight, targets)
    ref, n_ref = fused_linear_cross_entropy_ref(hidden, weight, targets)
    torch.testing.assert_close(loss, ref)
    assert n.item() == n_ref.item()
    h0 = hidden[:0].clone().requires_grad_()  # a micro-batch whose rows were all masked out
    loss, n = fused_linear_cross_entropy(h0, weight, targets[:0])
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0 and h0.grad.shape == (0, 16)


@pytest.mark.gpu
def test_flce_llama3_8b_frozen_head(cuda):
    (hidden, weight, _), targets = _inputs(16384, 4096, 128256, cuda, bias=False)
    check_against_reference(
        "flce[8B]",
        lambda h, w: fused_linear_cross_entropy(h, w, targets),
        lambda h, w: fused_linear_cross_entropy_ref(h, w, targets),
        [hidden, weight], torch.bfloat16, requires_grad=[True, False],
    )
