"""4-bit dequantization kernel against bitsandbytes (the format's owner) and the PyTorch reference:
bitwise equal, NF4 and FP4, with and without double quantization, every output dtype, odd sizes and
ragged last blocks, uint8 and bf16 (ZeRO-3) storage; fresh random weights per test.

bitsandbytes 0.50's native CPU dequantization is wrong where a row's length is not a multiple of the
block size (blocks that straddle rows: errors of ~2 on N(0, 1) weights; its CUDA kernel and its pure
PyTorch fallback are right), so on CPU those shapes are checked against the reference only."""

import distsft_kernels as K
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="needs triton")


def _quantize(shape, dtype, quant_type, nested, blocksize, device, storage=torch.uint8):
    w = torch.randn(shape, dtype=dtype, device=device) * (1 + 3 * torch.rand(shape[0], 1, device=device)).to(dtype)
    data, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                                  quant_storage=storage)
    return w, data, state


def _bnb(data, state, device):
    """bitsandbytes' own dequantization where it is right (see the module docstring), else None."""
    if device.type == "cpu" and state.shape[-1] % state.blocksize:
        return None
    return F.dequantize_4bit(data, state)


def _nested(state):
    return (state.state2.absmax, state.state2.code, state.state2.blocksize, state.offset) if state.nested else None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,blocksize", [((123, 70), 64), ((64, 256), 64), ((37, 96), 32), ((300, 130), 128),
                                             ((48, 512), 256)])
def test_bitwise_equal_to_bitsandbytes(device, quant_type, nested, dtype, shape, blocksize):
    w, data, state = _quantize(shape, dtype, quant_type, nested, blocksize, device)
    ours = K.dequantize_4bit_state(data, state)
    ref = K.dequantize_4bit_ref(data, state.absmax, state.code, blocksize=state.blocksize, shape=tuple(state.shape),
                                dtype=state.dtype, nested=_nested(state))
    assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape == w.shape
    assert torch.equal(ours, ref), f"max diff {(ours.float() - ref.float()).abs().max().item()}"
    expected = _bnb(data, state, device)
    if expected is not None:
        assert torch.equal(ref, expected), f"max diff {(ref.float() - expected.float()).abs().max().item()}"
    # not a constant: the quantization error is that of 4 bits, and most values are distinct
    assert (ours.float() - w.float()).abs().max() < 0.35 * w.float().abs().max()
    assert ours.unique().numel() > 16


def test_bf16_storage_as_zero3_keeps_it(device):
    """quant_storage=bfloat16 (how ZeRO-3 partitions 4-bit weights): the same bytes, read through a view."""
    _, data, state = _quantize((96, 128), torch.bfloat16, "nf4", True, 64, device, storage=torch.bfloat16)
    assert data.dtype == torch.bfloat16
    assert torch.equal(K.dequantize_4bit_state(data, state), F.dequantize_4bit(data, state))


def test_a_flipped_nibble_moves_exactly_one_value(device):
    """Element order: element 2i is byte i's high nibble, 2i+1 its low one (a swapped order would fail here
    even where the two nibbles decode to close values)."""
    _, data, state = _quantize((8, 64), torch.float32, "nf4", False, 64, device)
    base = K.dequantize_4bit_state(data, state).reshape(-1)
    for byte, mask, element in ((5, 0xF0, 10), (5, 0x0F, 11), (200, 0x0F, 401)):
        mutated = data.clone()
        mutated.view(-1)[byte] ^= mask
        diff = (K.dequantize_4bit_state(mutated, state).reshape(-1) != base).nonzero().flatten().tolist()
        assert diff == [element], (byte, mask, diff)


@pytest.mark.parametrize("shape,extra", [((123, 70), 6), ((64, 256), 48), ((300, 130), 1)])
def test_into_the_columns_of_a_wider_buffer(device, shape, extra):
    """`out=` a column slice of a wider buffer (the fused LoRA's [W | B]): the same values as a fresh
    tensor, written row by row at the buffer's stride, the other columns untouched."""
    _, data, state = _quantize(shape, torch.bfloat16, "nf4", True, 64, device)
    wide = torch.full((shape[0], shape[1] + extra), 7.0, dtype=torch.bfloat16, device=device)
    got = K.dequantize_4bit_state(data, state, out=wide[:, :shape[1]])
    assert got.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[:, :shape[1]], K.dequantize_4bit_state(data, state))
    assert (wide[:, shape[1]:] == 7).all()


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,ranks,width", [((123, 70), (4, 4, 4), 12), ((64, 256), (16, 16), 40),
                                               ((300, 130), (8,), 8), ((200, 64), (3, 5), 13)])
def test_tail_writes_the_b_columns_in_the_same_launch(device, shape, ranks, width, b_dtype):
    """`Dequantizer(...)(out, tail=(b, col, width))`: W into the first columns of [W | B_pad], and the
    `width` columns after it zeros but b (cast) in its own, for each projection of a group; the buffer's
    columns past `width` untouched. Called twice per projection: the first launch compiles and records the
    direct launch, the second takes it."""
    _, data, state = _quantize(shape, torch.bfloat16, "nf4", True, 64, device)
    deq = K.Dequantizer.from_state(data, state)
    expected_w = K.dequantize_4bit_state(data, state)
    for i, r in enumerate(ranks):
        col = sum(ranks[:i])
        b = torch.randn(shape[0], r, device=device).to(b_dtype)
        wide = torch.full((shape[0], shape[1] + width + 3), 7.0, dtype=torch.bfloat16, device=device)
        for _ in range(2):
            wide[:, :shape[1] + width] = float("nan")
            got = deq(wide[:, :shape[1]], tail=(b, col, width))
            assert got.data_ptr() == wide.data_ptr()
            assert torch.equal(wide[:, :shape[1]], expected_w)
            expected_tail = torch.zeros(shape[0], width, dtype=torch.bfloat16, device=device)
            expected_tail[:, col:col + r] = b.to(torch.bfloat16)
            assert torch.equal(wide[:, shape[1]:shape[1] + width], expected_tail), (i, r)
            assert (wide[:, shape[1] + width:] == 7).all()


def test_bad_tail_is_named(device):
    _, data, state = _quantize((16, 64), torch.bfloat16, "nf4", False, 64, device)
    deq = K.Dequantizer.from_state(data, state)
    wide = torch.empty(16, 80, dtype=torch.bfloat16, device=device)
    b = torch.randn(16, 4, device=device)
    with pytest.raises(ValueError, match="needs out="):
        deq(tail=(b, 0, 16))
    with pytest.raises(ValueError, match=r"tail \(16, 4\)"):
        deq(wide[:, :64], tail=(b, 14, 16))  # past the tail's width
    with pytest.raises(ValueError, match="row stride"):
        deq(wide[:, :64], tail=(b, 0, 20))  # past the buffer's row
    with pytest.raises(ValueError, match=r"tail \(8, 4\)"):
        deq(wide[:, :64], tail=(b[:8], 0, 16))


def test_bad_out_is_named(device):
    _, data, state = _quantize((16, 64), torch.bfloat16, "nf4", False, 64, device)
    wide = torch.empty(16, 80, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match=r"out is \(16, 80\)"):
        K.dequantize_4bit_state(data, state, out=wide)
    with pytest.raises(ValueError, match="float32"):
        K.dequantize_4bit_state(data, state, out=torch.empty(16, 64, device=device))
    with pytest.raises(ValueError, match="contiguous rows"):
        K.dequantize_4bit_state(data, state, out=torch.empty(64, 16, dtype=torch.bfloat16, device=device).t())


def test_bad_inputs_are_named(device):
    _, data, state = _quantize((16, 64), torch.bfloat16, "nf4", False, 64, device)
    with pytest.raises(ValueError, match="packed bytes"):
        K.dequantize_4bit(data[:100], state.absmax, state.code, blocksize=64, shape=(16, 64), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="blocksize"):
        K.dequantize_4bit(data, state.absmax, state.code, blocksize=48, shape=(16, 64), dtype=torch.bfloat16)


@pytest.mark.gpu
def test_llama_8b_mlp_weight_on_gpu(cuda):
    """The largest Llama-3.1-8B projection (14336 x 4096) with QLoRA's settings, on the GPU's bitsandbytes."""
    import distsft_kernels._common as C

    _, data, state = _quantize((14336, 4096), torch.bfloat16, "nf4", True, 64, cuda)
    expected = F.dequantize_4bit(data, state)
    for _ in range(3):  # the first launch compiles, later ones take the direct launch path (checked once)
        assert torch.equal(K.dequantize_4bit_state(data, state), expected)
    assert C._direct_ok is True
    wide = torch.zeros(14336, 4096 + 32, dtype=torch.bfloat16, device=cuda)
    for _ in range(2):  # the row-strided variant: compiled, then launched directly
        K.dequantize_4bit_state(data, state, out=wide[:, :4096])
        assert torch.equal(wide[:, :4096], expected) and not wide[:, 4096:].any()
    deq, b = K.Dequantizer.from_state(data, state), torch.randn(14336, 16, device=cuda)
    for col in (16, 16, 0):  # [W | B_pad] with B in the second or the first 16 of 32 columns, launched directly
        wide.fill_(float("nan"))
        deq(wide[:, :4096], tail=(b, col, 32))
        assert torch.equal(wide[:, :4096], expected)
        assert torch.equal(wide[:, 4096 + col:4096 + col + 16], b.to(torch.bfloat16))
        zeros = wide[:, 4096:4096 + 32].clone()
        zeros[:, col:col + 16] = 0
        assert not zeros.any()


def test_bytes_given_per_call_follow_a_moved_weight(device):
    """ZeRO-3 gathers a 4-bit weight into a new buffer before every use and frees it after: a cached
    `Dequantizer` built with `hold_data=False` keeps no reference to the buffer it was built from (which
    would pin one gathered copy per layer) and reads the bytes passed to each call; wrong bytes are named."""
    import weakref

    _, data, state = _quantize((96, 130), torch.bfloat16, "nf4", True, 64, device)
    expected = K.dequantize_4bit_state(data, state)
    moved = data.clone()  # the same bytes in another buffer (a later gather)
    ref = weakref.ref(moved)
    deq = K.Dequantizer.from_state(moved, state, hold_data=False)
    del moved
    assert ref() is None  # not held
    with pytest.raises(ValueError, match="pass data="):
        deq()
    for _ in range(2):  # the second call takes the recorded direct launch
        assert torch.equal(deq(data=data.clone()), expected)
    out = torch.empty(96, 140, dtype=torch.bfloat16, device=device)[:, :130]
    assert torch.equal(deq(out, data=data), expected) and torch.equal(out, expected)
    with pytest.raises(ValueError, match="the weight needs"):
        deq(data=data[: data.numel() // 2])
