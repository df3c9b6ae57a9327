"""Packing: best-fit-decreasing plan, packed rows (positions restart, targets never cross documents),
collate, the document mask and cu_seqlens, packed == unpacked loss and LoRA gradients on a tiny Llama
(eager and sdpa), and the startup isolation self-check (those three from distsft/attention.py)."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_fixtures import byte_tokenizer, cfg, write_jsonl

from distsft.attention import (
    PackingIsolationError,
    check_packing_isolation,
    cu_seqlens_from_position_ids,
    document_attention_mask,
    document_ids,
    packed_attention_kwargs,
)
from distsft.data import build_datasets, collate, pack_best_fit_decreasing

# ---------------------------------------------------------------------------------------------------
# The plan


def slots_of(offsets, docs):
    return [docs[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def test_bfd_small_example():
    # decreasing: 6 -> new slot A(4 left); 5 -> new slot B(5 left); 4 -> best fit A (0 left);
    # 3 -> B (2 left); 2 -> B (0 left)
    off, docs = pack_best_fit_decreasing(np.array([3, 6, 2, 5, 4]), 10)
    assert slots_of(off, docs) == [[1, 4], [3, 0, 2]]


def test_bfd_beats_first_fit_in_order():
    # in order, next-fit would need 3 slots (7 | 5 | 3+... ); BFD pairs 7+3 and 5+5
    off, docs = pack_best_fit_decreasing(np.array([7, 5, 5, 3]), 10)
    assert sorted(map(sorted, slots_of(off, docs))) == [[0, 3], [1, 2]]


def test_bfd_invariants_random():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=2000)
    off, docs = pack_best_fit_decreasing(lengths, 512)
    assert sorted(docs.tolist()) == list(range(2000))           # every document exactly once
    fill = np.add.reduceat(lengths[docs], off[:-1])
    assert fill.max() <= 512
    assert lengths.sum() / (len(fill) * 512) > 0.97
    off2, docs2 = pack_best_fit_decreasing(lengths, 512)        # deterministic
    assert np.array_equal(off, off2) and np.array_equal(docs, docs2)


def test_bfd_rejects_oversized():
    with pytest.raises(ValueError, match="does not fit"):
        pack_best_fit_decreasing(np.array([5, 11]), 10)


# ---------------------------------------------------------------------------------------------------
# Packed rows, collate, mask, cu_seqlens


def packed_bundle(tmp_path, n=12, max_seq_len=96, **kw):
    rows = [{"prompt": f"p{i} " * (i % 4 + 1), "completion": f"answer {i}" + "!" * (i % 3)} for i in range(n)]
    return build_datasets(cfg(write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=max_seq_len, **kw),
                          byte_tokenizer(), seed=0)


def test_packed_sample_layout(tmp_path):
    ds = packed_bundle(tmp_path).train
    assert len(ds) < 12  # several documents per slot
    for i in range(len(ds)):
        s = ds[i]
        docs = ds.documents(i)
        assert len(docs) >= 1 and len(s["input_ids"]) <= 96
        start = 0
        for g in docs.tolist():
            ids, flags = ds.document(g)
            n = len(ids)
            seg = slice(start, start + n)
            assert s["input_ids"][seg].tolist() == ids.tolist()
            assert s["position_ids"][seg].tolist() == list(range(n))
            tgt = s["target_ids"][seg].tolist()
            assert tgt[-1] == -100  # never a target across the document boundary
            assert tgt[:-1] == [int(ids[t + 1]) if flags[t + 1] else -100 for t in range(n - 1)]
            start += n
        assert start == len(s["input_ids"])


def test_packing_report_and_efficiency(tmp_path):
    b = packed_bundle(tmp_path)
    ds = b.train
    assert b.report.train.sequences == len(ds)
    assert b.report.packing_efficiency == pytest.approx(ds.num_tokens / (len(ds) * 96))
    assert b.report.train.tokens == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    assert b.report.train.target_tokens == sum(int((ds[i]["target_ids"] != -100).sum()) for i in range(len(ds)))
    off = build_datasets(cfg(tmp_path / "d.jsonl", max_seq_len=96, packing=False), byte_tokenizer(), seed=0)
    assert len(off.train) == 12 and off.report.packing_efficiency == 1.0


def test_collate():
    a = {"input_ids": torch.tensor([5, 6, 7, 8, 9]), "position_ids": torch.tensor([0, 1, 2, 0, 1]),
         "target_ids": torch.tensor([6, 7, -100, 9, -100])}
    b = {"input_ids": torch.tensor([5, 6]), "position_ids": torch.tensor([0, 1]),
         "target_ids": torch.tensor([6, -100])}
    out = collate([a, b], pad_token_id=2)
    assert {k: v.shape for k, v in out.items()} == {k: (2, 8) for k in ("input_ids", "position_ids", "target_ids")}
    assert out["input_ids"][1].tolist() == [5, 6, 2, 2, 2, 2, 2, 2]
    assert out["target_ids"][1].tolist() == [6, -100, -100, -100, -100, -100, -100, -100]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]  # padding: its own run from 0
    assert out["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    assert collate([a], pad_token_id=0, pad_to_multiple_of=1)["input_ids"].shape == (1, 5)


def test_document_attention_mask_exact():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = document_attention_mask(pos, torch.float32)
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.float32
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert float(m.min()) == torch.finfo(torch.float32).min
    assert document_attention_mask(pos, torch.bfloat16).dtype == torch.bfloat16
    # a run that does not restart at 0 still starts a new document (position jump)
    assert document_ids(torch.tensor([[3, 4, 9, 10, 0]])).tolist() == [[1, 1, 2, 2, 3]]


def test_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 0, 0, 1]])
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 8, 13, 14, 16]
    assert max_len == 5
    # a row that continues the previous row's positions still starts a document
    cu2, _ = cu_seqlens_from_position_ids(torch.tensor([[0, 1], [2, 3]]))
    assert cu2.tolist() == [0, 2, 4]


# ---------------------------------------------------------------------------------------------------
# Packed vs unpacked on a tiny Llama with LoRA


def tiny_lora_model(impl, vocab):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                      init_lora_weights=False)  # random B: LoRA changes the output, so A and B get gradients
    return get_peft_model(model, lora)


def doc_losses(model, batch, mask):
    """Summed token CE per (row, document run) and the LoRA gradients of the total."""
    model.zero_grad()
    kw = {} if mask is None else {"attention_mask": mask}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kw).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), ignore_index=-100,
                         reduction="none").view(batch["target_ids"].shape)
    doc = document_ids(batch["position_ids"])
    out = []
    for b in range(ce.shape[0]):
        for d in doc[b].unique().tolist():
            sel = (doc[b] == d) & (batch["target_ids"][b] != -100)
            if sel.any():
                out.append(ce[b][sel].sum())
    total = ce.sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_equals_unpacked_loss_and_lora_grads(tmp_path, impl):
    b = packed_bundle(tmp_path, n=8, max_seq_len=128)
    ds = b.train
    assert any(len(ds.documents(i)) > 1 for i in range(len(ds)))
    model = tiny_lora_model(impl, vocab=len(byte_tokenizer()))

    packed = collate([ds[i] for i in range(len(ds))], pad_token_id=2)
    mask = document_attention_mask(packed["position_ids"], torch.float32)
    p_losses, p_grads = doc_losses(model, packed, mask)

    # reference: every document alone, in packing order, no padding, plain causal attention
    u_losses, u_grads = [], None
    for i in range(len(ds)):
        for g in ds.documents(i).tolist():
            ids, flags = ds.document(g)
            one = {"input_ids": torch.tensor(ids)[None], "position_ids": torch.arange(len(ids))[None]}
            tgt = np.full(len(ids), -100)
            tgt[:-1] = np.where(flags[1:], ids[1:], -100)
            one["target_ids"] = torch.tensor(tgt)[None]
            losses, grads = doc_losses(model, one, None)
            u_losses += losses
            u_grads = grads if u_grads is None else {k: u_grads[k] + grads[k] for k in grads}
    assert len(p_losses) == len(u_losses) == len(ds.doc_index)
    torch.testing.assert_close(torch.stack(p_losses), torch.stack(u_losses), rtol=1e-5, atol=1e-5)
    assert set(p_grads) == set(u_grads) and len(p_grads) > 0
    for k in p_grads:
        assert u_grads[k].abs().max() > 0, k
        torch.testing.assert_close(p_grads[k], u_grads[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")

    # the comparison has teeth: a causal-only mask (documents see each other) changes the losses
    t = packed["position_ids"].shape[1]
    causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None].expand(len(ds), 1, t, t)
    leaky, _ = doc_losses(model, packed, causal)
    assert not torch.allclose(torch.stack(leaky), torch.stack(u_losses), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# Startup self-check


def no_cache_forward(model):
    def forward(input_ids, position_ids, attention_mask):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kw).logits

    return forward


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("use_mask", [True, False])
def test_isolation_check_passes(impl, use_mask):
    model = tiny_lora_model(impl, vocab=300)
    model.train()
    # the 4-D mask isolates documents with any call; position_ids alone only without a cache
    fwd = None if use_mask else no_cache_forward(model)
    out = check_packing_isolation(model, use_document_mask=use_mask, forward=fwd)
    assert out["attn_implementation"] == impl and out["max_abs_diff"] <= out["tolerance"]
    assert model.training  # mode restored


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_position_ids_only_leaks_when_a_cache_is_built(impl):
    """transformers detects packed position_ids only when past_key_values is None; a plain forward
    (config.use_cache=True) builds a DynamicCache, and documents see each other. The check catches it."""
    model = tiny_lora_model(impl, vocab=300)
    with pytest.raises(PackingIsolationError, match=rf"'{impl}' leaks .*position_ids only"):
        check_packing_isolation(model, use_document_mask=False)


def test_isolation_check_names_a_leaky_backend():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, query, key, value, attention_mask, **kw):  # ignores the mask: plain causal
        return sdpa_attention_forward(module, query, key, value, None, **kw)

    AttentionInterface.register("leaky_test", leaky)
    model = tiny_lora_model("eager", vocab=300)
    model.base_model.model.set_attn_implementation("leaky_test")
    with pytest.raises(PackingIsolationError, match=r"'leaky_test' leaks across packed documents"):
        check_packing_isolation(model, use_document_mask=True)


def test_packed_attention_kwargs():
    pos = torch.tensor([[0, 1, 0]])
    assert set(packed_attention_kwargs(pos, "sdpa", torch.float32)) == {"attention_mask"}
    assert packed_attention_kwargs(pos, "flash_attention_2", torch.bfloat16) == {}


def test_isolation_check_in_bf16_catches_a_leak_by_swapping_neighbours():
    """Half precision: the alone comparison is loose (rounding through deep models), so the swap test
    must catch the leak on its own: a leaky backend moves a document's logits when its neighbours change,
    an isolating one does not move them at all."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, query, key, value, attention_mask, **kw):  # ignores the mask: plain causal
        return sdpa_attention_forward(module, query, key, value, None, **kw)

    AttentionInterface.register("leaky_test_bf16", leaky)
    model = tiny_lora_model("sdpa", vocab=300).to(torch.bfloat16)
    out = check_packing_isolation(model, use_document_mask=True)
    assert out["swap_max_abs_diff"] <= out["swap_tolerance"] and out["tolerance"] > 100 * out["swap_tolerance"]
    model.base_model.model.set_attn_implementation("leaky_test_bf16")
    with pytest.raises(PackingIsolationError, match=r"move by up to .* when the other documents") as err:
        check_packing_isolation(model, use_document_mask=True)
    found = re.search(r"move by up to (\S+) .*?tolerance (\S+?)\)", str(err.value))
    swap, swap_tol = (float(x) for x in found.groups())
    assert swap > swap_tol  # the swap test sees the leak, whatever the loose alone comparison says
