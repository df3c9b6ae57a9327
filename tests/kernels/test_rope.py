"""RoPE kernel against HF's `apply_rotary_pos_emb`: q and k (GQA head counts), per-token positions
(packed sequences restarting at 0), cos/sin shared over the batch or per sample, Llama-3.1 scaling."""

import pytest
import torch
from distsft_kernels import rope, rope_ref
from kernel_tolerances import check_against_reference

# (batch, seq, q heads, kv heads, head_dim)
SHAPES = [(2, 37, 6, 2, 16), (1, 16, 4, 4, 128), (3, 9, 8, 1, 62)]


def _cos_sin(position_ids, head_dim, device, base=10000.0, inv_freq=None):
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B|1, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _packed_positions(bsz, seq):
    """Each row packs documents of random lengths; positions restart at 0 at each document."""
    rows = []
    for _ in range(bsz):
        cuts = sorted(torch.randperm(seq - 1)[:2].add(1).tolist())
        bounds = [0, *cuts, seq]
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:], strict=False)]))
    return torch.stack(rows)


def _fns(layout, duplicated=False):
    """q, k are given as (B, T, H, D); the kernel sees HF's (B, H, T, D), strided or contiguous."""
    def to_hf(x):
        return x.clone().transpose(1, 2) if layout == "strided" else x.transpose(1, 2).contiguous()
    return (lambda q, k, c, s: rope(to_hf(q), to_hf(k), c, s, duplicated_halves=duplicated),
            lambda q, k, c, s: rope_ref(to_hf(q), to_hf(k), c, s))


@pytest.mark.parametrize("duplicated", [False, True], ids=["cos-both-halves", "cos-first-half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["strided", "contiguous"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(shape, layout, dtype, duplicated, device):
    bsz, seq, hq, hk, d = shape
    q = torch.randn(bsz, seq, hq, d, device=device)
    k = torch.randn(bsz, seq, hk, d, device=device)
    cos, sin = _cos_sin(_packed_positions(bsz, seq).to(device), d, device)  # (B, T, D)
    kern, ref = _fns(layout, duplicated)
    check_against_reference("rope", kern, ref, [q, k, cos, sin], dtype, requires_grad=[True, True, False, False])


def test_rope_reads_both_halves_unless_told_they_repeat(device):
    """cos/sin whose halves differ (valid for HF's formula): matched by default; `duplicated_halves=True`
    reads the first halves only, so it must differ here (the flag is a promise, not a check)."""
    q = torch.randn(2, 11, 4, 32, device=device)
    k = torch.randn(2, 11, 2, 32, device=device)
    cos, sin = torch.rand(2, 11, 32, device=device), torch.rand(2, 11, 32, device=device)
    kern, ref = _fns("strided")
    check_against_reference("rope[distinct halves]", kern, ref, [q, k, cos, sin], torch.float32,
                            requires_grad=[True, True, False, False])
    wrong, _ = _fns("strided", duplicated=True)
    assert not torch.allclose(wrong(q, k, cos, sin)[0], ref(q, k, cos, sin)[0], atol=1e-3)


def test_rope_shared_positions_and_llama31_scaling(device):
    """cos/sin of shape (1, T, D) broadcast over the batch, from HF's Llama-3.1 rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    emb = LlamaRotaryEmbedding(cfg).to(device)
    q = torch.randn(3, 40, 4, 64, device=device)
    k = torch.randn(3, 40, 2, 64, device=device)
    cos, sin = emb(q, torch.arange(40, device=device)[None])  # (1, T, D)
    assert cos.shape == (1, 40, 64)
    kern, ref = _fns("strided")
    check_against_reference("rope[llama3.1]", kern, ref, [q, k, cos, sin], torch.float32,
                            requires_grad=[True, True, False, False])


def test_rope_is_in_place_and_guards_saved_tensors(device):
    q = torch.randn(1, 2, 5, 8, device=device)
    k = torch.randn(1, 1, 5, 8, device=device)
    cos, sin = _cos_sin(torch.arange(5, device=device)[None], 8, device)
    q_ptr = q.data_ptr()
    qr, _ = rope(q, k, cos, sin)
    assert qr.data_ptr() == q_ptr
    # A tensor saved by an earlier op must not be read rotated: autograd has to refuse the backward.
    x = torch.randn(1, 5, 16, device=device, requires_grad=True)
    q = torch.sigmoid(x).view(1, 5, 2, 8).transpose(1, 2)  # sigmoid saves its output
    qr, kr = rope(q, torch.randn(1, 1, 5, 8, device=device), cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        qr.sum().backward()


def test_rope_rejects_mismatched_shapes(device):
    q, k = torch.randn(2, 4, 5, 8, device=device), torch.randn(2, 2, 5, 8, device=device)
    cos, sin = _cos_sin(torch.arange(5, device=device)[None], 8, device)
    for args in ((q, k[..., :6], cos, sin), (q, k, cos[..., :4], sin[..., :4]), (q, k, cos[:, :4], sin[:, :4]),
                 (q, k, cos.expand(3, 5, 8), sin.expand(3, 5, 8)), (q, k, cos, sin[:, :4]), (q, k, cos[0], sin[0])):
        with pytest.raises(ValueError, match="rope"):
            rope(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_llama3_8b_shape(dtype, cuda):
    bsz, seq, hq, hk, d = 4, 4096, 32, 8, 128  # 16,384 tokens
    q = torch.randn(bsz, seq, hq, d, device=cuda)
    k = torch.randn(bsz, seq, hk, d, device=cuda)
    cos, sin = _cos_sin(_packed_positions(bsz, seq).to(cuda), d, cuda, base=500000.0)
    kern, ref = _fns("strided")
    check_against_reference("rope[8B]", kern, ref, [q, k, cos, sin], dtype, requires_grad=[True, True, False, False])
