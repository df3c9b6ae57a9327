"""cast_concat (kernels/distsft_kernels/cast.py) against torch's cat and cast: bitwise equal, 1 to 8 tensors, odd sizes,
every source and target dtype, signed zeros and infinities carried through, NaN kept NaN; fresh inputs per test."""

import distsft_kernels as K
import pytest
import torch

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="needs triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(tensors, dtype):
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_bitwise_equal_to_torch(device, n, out_dtype):
    from distsft_kernels.cast import cast_concat

    g = torch.Generator(device="cpu").manual_seed(n)
    shapes = [(int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)))
              for _ in range(n)]
    tensors = [(torch.randn(s, device=device) * 10 ** (k - 2)).to(DTYPES[k % 3]) for k, s in enumerate(shapes)]
    tensors[0].view(-1)[:4] = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan")])
    got = cast_concat(tensors, out_dtype)
    expected = _reference(tensors, out_dtype)
    assert got.dtype == out_dtype and got.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)  # NaN's payload bits are not specified (torch's CPU cast sets them all)
    bits = torch.int16 if out_dtype != torch.float32 else torch.int32
    assert torch.equal(got[~nan].view(bits), expected[~nan].view(bits))  # -0.0 and infinities included


def test_lora_group_views(device):
    """The use in lora_projections: fp32 A_1..A_3 (r, d_in) then B_1..B_3 (d_out_i, r) in bf16, read back as
    cat_i A_i and each B_i."""
    from distsft_kernels.cast import cast_concat

    a = [torch.randn(4, 96, device=device) for _ in range(3)]
    b = [torch.randn(o, 4, device=device) for o in (96, 24, 24)]
    flat = cast_concat([*a, *b], torch.bfloat16)
    assert torch.equal(flat[:3 * 4 * 96].view(12, 96), torch.cat(a).to(torch.bfloat16))
    off = 3 * 4 * 96
    for t in b:
        assert torch.equal(flat[off:off + t.numel()].view(t.shape), t.to(torch.bfloat16))
        off += t.numel()


def test_bad_inputs_are_named(device):
    from distsft_kernels.cast import cast_concat

    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match="1 to 8 tensors, got 9"):
        cast_concat([x] * 9, torch.bfloat16)
    with pytest.raises(ValueError, match="tensor 1 is"):
        cast_concat([x, x.t()], torch.bfloat16)
    with pytest.raises(ValueError, match="tensor 0 is torch.int64"):
        cast_concat([torch.ones(3, dtype=torch.long, device=device)], torch.bfloat16)


def test_host_launch_arithmetic_matches_triton():
    """kernels/distsft_kernels/_common.py's cdiv and next_pow2 (plain Python on every launch) against Triton's own."""
    import triton
    from distsft_kernels._common import cdiv, next_pow2

    for n in [1, 2, 3, 4, 5, 7, 8, 9, 48, 1000, 1024, 1025, 2**20 + 1]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 64, 4096):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert cdiv(0, 7) == 0 and next_pow2(0) == 1
