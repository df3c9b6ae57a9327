"""Cross-entropy kernel against `F.cross_entropy(logits.float(), reduction="sum")`: loss sum, count,
gradient; ignore_index, label smoothing, soft-capping, vocab up to Llama-3's 128,256, in place or not."""

import pytest
import torch
from distsft_kernels import cross_entropy, cross_entropy_ref
from kernel_tolerances import assert_errors, check_against_reference

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp, interpreter

# (tokens, vocab): tiny odd vocab; a vocab over several blocks; Llama-3's vocab with few tokens
SHAPES = [(9, 123), (6, 5000), (4, 128256)]
OPTIONS = [(0.0, None), (0.1, None), (0.0, 30.0), (0.05, 20.0)]  # (label_smoothing, softcap)


def _targets(n, vocab, device):
    t = torch.randint(0, vocab, (n,), device=device)
    t[1] = -100  # an ignored row (prompt token or padding)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing,softcap", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference(shape, smoothing, softcap, dtype, device):
    n, vocab = shape
    logits = torch.randn(n, vocab, device=device) * 4
    targets = _targets(n, vocab, device)
    kw = dict(label_smoothing=smoothing, softcap=softcap)
    check_against_reference(
        "cross_entropy",
        lambda x: cross_entropy(x.clone(), targets, inplace=True, **kw),  # clone: a non-leaf we own
        lambda x: cross_entropy_ref(x, targets, **kw),
        [logits], dtype,
    )


def test_out_of_place_leaves_logits_untouched_and_sums(device):
    logits = torch.randn(5, 77, device=device, requires_grad=True)
    before = logits.detach().clone()
    targets = _targets(5, 77, device)
    loss, n = cross_entropy(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n.dtype == torch.int64 and n.item() == 4
    (2 * loss).backward()
    assert torch.equal(logits.detach(), before)
    ref, _ = cross_entropy_ref(before.clone().requires_grad_(), targets)
    torch.testing.assert_close(loss, ref)


def test_all_ignored_and_no_grad(device):
    logits = torch.randn(3, 50, device=device, requires_grad=True)
    loss, n = cross_entropy(logits, torch.full((3,), -100, device=device))
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert torch.count_nonzero(logits.grad) == 0
    with torch.no_grad():  # forward only: no gradient pass
        loss, _ = cross_entropy(logits.detach(), _targets(3, 50, device))
    assert torch.isfinite(loss)


def test_inplace_guards_saved_logits(device):
    x = torch.randn(4, 33, device=device, requires_grad=True)
    logits = torch.exp(x)  # exp saves its output: overwriting it must fail loudly
    loss, _ = cross_entropy(logits, _targets(4, 33, device), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.parametrize("smoothing,softcap", [(0.0, None), (0.1, 30.0)])
def test_cross_entropy_llama3_vocab_16k_tokens(smoothing, softcap, cuda):
    """The kernel on all 16,384 x 128,256 bf16 logits at once; the references (whose fp32 copies would not
    fit next to it) row chunk by row chunk, compared by the same rule on the maxima over all chunks."""
    n, vocab = 16384, 128256
    logits = (torch.randn(n, vocab, device=cuda) * 4).to(torch.bfloat16)
    targets = _targets(n, vocab, cuda)
    kw = dict(label_smoothing=smoothing, softcap=softcap)
    grad_scale = 0.37
    kernel_in = logits.clone().requires_grad_()
    loss_k, count = cross_entropy(kernel_in, targets, **kw)
    (loss_k * grad_scale).backward()
    grad_k = kernel_in.grad
    loss_s = loss_h = 0.0
    err_k = err_t = scale = 0.0
    for rows in torch.arange(n, device=cuda).split(2048):
        ref = {}
        for dtype in (torch.bfloat16, torch.float32):  # same dtype as the kernel; one precision up
            x = logits[rows].to(dtype).requires_grad_()
            loss, _ = cross_entropy_ref(x, targets[rows], **kw)
            (loss * grad_scale).backward()
            ref[dtype] = (loss.double().item(), x.grad)
        loss_s, loss_h = loss_s + ref[torch.bfloat16][0], loss_h + ref[torch.float32][0]
        high = ref[torch.float32][1].double()
        err_k = max(err_k, (grad_k[rows].double() - high).abs().max().item())
        err_t = max(err_t, (ref[torch.bfloat16][1].double() - high).abs().max().item())
        scale = max(scale, high.abs().max().item())
    assert count.item() == int((targets != -100).sum())
    assert torch.isfinite(grad_k).all()
    # the loss is an fp32 output (as in check_against_reference), the gradient bf16
    assert_errors("cross_entropy[8B] loss", torch.float32, abs(loss_k.item() - loss_h), abs(loss_s - loss_h), loss_h)
    assert_errors("cross_entropy[8B] grad", torch.bfloat16, err_k, err_t, scale)
