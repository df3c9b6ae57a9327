"""Loss normalisation and parity with plain HF + PEFT."""

import pytest
import torch

from distsft.config import KernelsConfig, LoraConfig, ModelConfig
from distsft.loss import backward_scale, count_targets, select_loss_fn
from distsft.model import CausalLMWithLoss, add_lora, load_base_model


def tiny_lora_model(model_dir, seed=0):
    cfg = ModelConfig(init_from_config=str(model_dir), dtype="float32", attn_implementation="eager")
    peft_model = add_lora(load_base_model(cfg, torch.device("cpu"), seed=seed), LoraConfig(r=4, alpha=8))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at zero, which would leave every lora_A gradient zero
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return CausalLMWithLoss(peft_model, select_loss_fn(KernelsConfig(backend="torch")))  # the reference loss


def make_batch(lengths, vocab, seed, mask_prompt=3):
    """Rows of the given lengths, right-padded; targets are the next token, prompts masked."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    tgt = torch.full((len(lengths), T), -100)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        tgt[b, mask_prompt : n - 1] = ids[b, mask_prompt + 1 : n]
    pos = torch.arange(T).expand(len(lengths), T).clone()
    return {"input_ids": ids, "target_ids": tgt, "position_ids": pos}


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_backward_scale_rejects_empty_step():
    with pytest.raises(ValueError, match="no target tokens"):
        backward_scale(0, 1)


def test_ragged_micro_batches_equal_one_concatenated_batch(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir)
    vocab = model.causal_lm.config.vocab_size
    rows = [[9, 31, 17], [40, 6], [23, 12, 35, 8]]  # K=3 micro-batches of ragged lengths and sizes
    micro = [make_batch(r, vocab, seed=i) for i, r in enumerate(rows)]
    total = count_targets(micro)

    for mb in micro:  # the loop's math, one process
        s, _ = model(**mb)
        (s * backward_scale(total, world_size=1)).backward()
    ours = lora_grads(model)

    model.zero_grad()
    whole = make_batch([n for r in rows for n in r], vocab, seed=99)
    for b, (i, j) in enumerate((i, j) for i, r in enumerate(rows) for j in range(len(r))):  # same rows
        n = rows[i][j]
        whole["input_ids"][b].zero_()
        whole["input_ids"][b, :n] = micro[i]["input_ids"][j, :n]
        whole["target_ids"][b].fill_(-100)
        whole["target_ids"][b, :n] = micro[i]["target_ids"][j, :n]
    s, n = model(**whole)
    assert int(n) == total
    (s / n).backward()
    ref = lora_grads(model)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)

    # The common bug (each micro-batch normalised by its own count) gives another gradient: this test
    # would notice it.
    model.zero_grad()
    for mb in micro:
        s, n = model(**mb)
        (s / n / len(micro)).backward()
    naive = lora_grads(model)
    assert any(not torch.allclose(naive[k], ref[k], rtol=1e-3) for k in ref)


def test_first_step_loss_and_grads_equal_hf_peft_labels_loss(tiny_model_dir):
    model = tiny_lora_model(tiny_model_dir)
    vocab = model.causal_lm.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked prompt
    labels[1, 20:] = -100

    hf = model.peft_model(input_ids=ids, labels=labels).loss  # HF shifts labels inside
    hf.backward()
    hf_grads = lora_grads(model)
    model.zero_grad()

    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # ours: already shifted
    s, n = model(input_ids=ids, target_ids=targets)
    ours = s / n
    ours.backward()
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, hf_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_host_target_index_gives_the_same_loss_and_gradients(tiny_model_dir):
    """train.to_device passes `target_index` computed from the host labels (no sync in the loss): the loss,
    the count and every gradient equal those of the in-model selection; an index on another device is refused."""
    from distsft.loss import target_indices
    from distsft.train import to_device

    model = tiny_lora_model(tiny_model_dir)
    batch = make_batch([11, 7, 14], model.causal_lm.config.vocab_size, seed=5)
    moved = to_device(batch, torch.device("cpu"), packed=False, attn_impl="eager", dtype=torch.float32)
    assert torch.equal(moved["target_index"], batch["target_ids"].reshape(-1).ne(-100).nonzero().squeeze(1))
    s, n = model(**moved)
    s.backward()
    with_index = lora_grads(model)
    model.zero_grad()
    s_ref, n_ref = model(**batch)
    s_ref.backward()
    assert int(n) == int(n_ref) == int(batch["target_ids"].ne(-100).sum())
    assert torch.equal(s, s_ref)
    for name, g in lora_grads(model).items():
        assert torch.equal(with_index[name], g), name
    with pytest.raises(ValueError, match="target_index is on meta"):
        model(**batch, target_index=target_indices(batch["target_ids"]).to("meta"))
