"""`attn_implementation: distsft_varlen` against SDPA with the document mask: logits and LoRA gradients on
packed and unpacked batches (CPU: its SDPA fallback; `-m gpu`: varlen_attn itself), and its refusals."""

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from distsft import attention
from distsft.attention import check_packing_isolation, packed_attention_kwargs
from distsft.config import KernelsConfig
from distsft.loss import select_loss_fn
from distsft.model import CausalLMWithLoss

attention.register()
CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)  # GQA: 4 query heads share 2 key/value heads


def _pair(device="cpu", dtype=torch.float32):
    """The same LoRA model twice: distsft_varlen and sdpa."""
    torch.manual_seed(0)
    models = []
    for impl in ("distsft_varlen", "sdpa"):
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG), dtype=dtype,
                                                          attn_implementation=impl)
        m.config.use_cache = False
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        torch.manual_seed(1)
        loss_fn = select_loss_fn(KernelsConfig(backend="torch"))  # the reference loss
        models.append(CausalLMWithLoss(get_peft_model(m, lora), loss_fn).to(device))
    return models


def _packed_batch(device="cpu", lengths=(7, 5, 4), rows=2):
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(rows, sum(lengths)).contiguous()
    ids = torch.randint(0, CONFIG["vocab_size"], pos.shape, generator=torch.Generator().manual_seed(3))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    return ids.to(device), pos, targets.to(device)


def _loss_and_grads(model, ids, pos, targets, impl):
    model.zero_grad(set_to_none=True)
    kw = packed_attention_kwargs(pos, impl, next(model.parameters()).dtype)
    kw = {k: v.to(ids.device) if torch.is_tensor(v) and k == "attention_mask" else v for k, v in kw.items()}
    s, n = model(ids, targets, position_ids=pos.to(ids.device), **kw)
    (s / n).backward()
    return s / n, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def test_packed_loss_and_grads_match_sdpa_with_document_mask():
    varlen, sdpa = _pair()
    batch = _packed_batch()
    loss_v, grads_v = _loss_and_grads(varlen, *batch, "distsft_varlen")
    loss_s, grads_s = _loss_and_grads(sdpa, *batch, "sdpa")
    torch.testing.assert_close(loss_v, loss_s, rtol=1e-5, atol=1e-6)
    assert grads_v.keys() == grads_s.keys() and grads_v
    for k in grads_v:
        torch.testing.assert_close(grads_v[k], grads_s[k], rtol=1e-4, atol=1e-6, msg=k)


def test_unpacked_rows_are_plain_causal():
    varlen, sdpa = _pair()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(varlen.logits(ids), sdpa.logits(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(16,), (9, 7)], ids=["one-document-per-row", "two-documents-per-row"])
def test_rows_of_one_document_take_plain_causal_attention(monkeypatch, lengths):
    """Packed rows that each hold one whole document go through SDPA's causal kernel (no lengths, no mask);
    rows holding several keep the document-aware path. Both match SDPA with the document mask."""
    varlen, sdpa = _pair()
    masks = []
    real = attention._document_causal_mask
    monkeypatch.setattr(attention, "_document_causal_mask", lambda *a: masks.append(1) or real(*a))
    batch = _packed_batch(lengths=lengths, rows=3)
    loss_v, grads_v = _loss_and_grads(varlen, *batch, "distsft_varlen")
    loss_s, grads_s = _loss_and_grads(sdpa, *batch, "sdpa")
    torch.testing.assert_close(loss_v, loss_s, rtol=1e-5, atol=1e-6)
    for k in grads_v:
        torch.testing.assert_close(grads_v[k], grads_s[k], rtol=1e-4, atol=1e-6, msg=k)
    assert bool(masks) == (len(lengths) > 1)


def test_passes_the_packing_self_check_and_a_leak_is_caught():
    varlen, _ = _pair()

    def probe(ids, pos, mask):
        return varlen.logits(ids, pos, **packed_attention_kwargs(pos, "distsft_varlen", torch.float32))

    check_packing_isolation(varlen.causal_lm, attn_implementation="distsft_varlen", forward=probe)
    # Without the document lengths the same model is merely causal over the row: the check must catch it.
    with pytest.raises(RuntimeError, match="leaks across packed documents"):
        check_packing_isolation(varlen.causal_lm, attn_implementation="distsft_varlen",
                                forward=lambda ids, pos, mask: varlen.logits(ids, pos))


def test_refusals():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="soft-capping"):
        attention.varlen_attention_forward(None, q, q, q, None, softcap=50.0)
    with pytest.raises(ValueError, match="dropout"):
        attention.varlen_attention_forward(None, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding-window"):
        attention.varlen_attention_forward(None, q, q, q, None, sliding_window=4)


@pytest.mark.gpu
def test_cuda_varlen_matches_sdpa_bf16():
    """varlen_attn itself (flash, GQA) against SDPA with the document mask, bf16 on the GPU: loss and every
    LoRA gradient within bf16 noise of each other (relative to the largest gradient)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    varlen, sdpa = _pair("cuda", torch.bfloat16)
    batch = _packed_batch("cuda", lengths=(300, 17, 1, 190), rows=3)
    loss_v, grads_v = _loss_and_grads(varlen, *batch, "distsft_varlen")
    loss_s, grads_s = _loss_and_grads(sdpa, *batch, "sdpa")
    assert abs(float(loss_v) - float(loss_s)) < 2e-2 * abs(float(loss_s))
    for k in grads_v:
        scale = grads_s[k].abs().max().item()
        assert (grads_v[k] - grads_s[k]).abs().max().item() <= 5e-2 * scale, k
