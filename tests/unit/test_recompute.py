"""`gradient_checkpointing: auto` (distsft/recompute.py): the per-layer activation measurement against an
independent count, the choice of k against the budget, and checkpointed layers changing no number."""

import gc
import logging
from dataclasses import replace

import pytest
import torch
from _support import write_tiny_llama
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distsft.attention import packed_attention_kwargs
from distsft.config import ConfigError, KernelsConfig, LoraConfig, ModelConfig, load_config
from distsft.model import build_model
from distsft.recompute import (
    GIB,
    apply_recomputation,
    decoder_layers,
    is_checkpointed,
    measure_layer_activations,
    plan_recomputation,
)

LAYERS, B, T = 4, 2, 32


def _model(model_dir, kernels=None, seed=0):
    """Tiny Llama + LoRA + our kernels (Triton under the interpreter), with random LoRA B so that every
    adapter parameter gets a gradient; the same seed gives the same model."""
    cfg = ModelConfig(init_from_config=str(model_dir), tokenizer="builtin:tiny-llama", dtype="float32",
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    model, _ = build_model(cfg, LoraConfig(r=4), kernels or KernelsConfig(), torch.device("cpu"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("recompute") / "model", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def model(model_dir):
    return _model(model_dir)


def _batch(vocab=256):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(T - 20)]).expand(B, T)  # two packed documents per row
    targets = ids.roll(-1, 1)
    targets[:, [19, T - 1]] = -100
    targets[0, :5] = -100  # a masked prompt
    batch = {"input_ids": ids, "target_ids": targets, "position_ids": pos}
    batch.update(packed_attention_kwargs(pos, "sdpa", torch.float32))
    return batch


class _RetainedAllocations(TorchDispatchMode):
    """Every storage an op allocates (its output's storage is none of its inputs': not a view, not in
    place), weakly referenced: after the forward, those still alive are what the graph keeps."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s = t.untyped_storage()
                if s.data_ptr() not in inputs:
                    self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out

    def retained_bytes(self, exclude=()) -> int:
        gc.collect()
        return sum(n for ptr, (ref, n) in self.storages.items() if not ref.expired() and ptr not in exclude)


def _layer_inputs(model):
    layer = decoder_layers(model)[0]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=dict(k)),
                                             with_kwargs=True)
    with torch.no_grad():
        model.causal_lm.get_decoder()(input_ids=torch.zeros(B, T, dtype=torch.long),
                                      position_ids=torch.arange(T).expand(B, T), use_cache=False)
    handle.remove()
    return layer, captured["args"], captured["kwargs"]


@pytest.mark.parametrize("backend", ["auto", "torch"])  # our kernels (Triton interpreted) and HF's modules
def test_measured_layer_bytes_equal_memory_the_graph_retains(model_dir, backend):
    """The planner's count (saved_tensors_hooks, distinct storages, no parameters) equals an independent
    one: the bytes allocated during one layer forward that are still alive afterwards (the output
    excepted), which also sees tensors a custom Function keeps on `ctx` outside save_for_backward."""
    model = _model(model_dir, KernelsConfig(backend=backend))
    measured = measure_layer_activations(model, B, T)
    layer, args, kwargs = _layer_inputs(model)
    leaf = args[0].detach().clone().requires_grad_(True)
    mode = _RetainedAllocations()
    with mode:
        hidden = leaf.clone()  # allocated under the mode: counted if and only if the layer saves it
        out = layer(hidden, *args[1:], **kwargs)
    del hidden
    retained = mode.retained_bytes(exclude={out.untyped_storage().data_ptr()})
    assert measured["layer"] == retained > 0
    assert measured["input"] == B * T * 64 * 4  # (B, T, d) fp32
    assert 0 < measured["largest"] <= measured["layer"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_planning_frees_everything_it_allocated(model_dir, backend):
    """Regression: the pack hook returned the saved tensor itself, so a saved *output* held its own
    grad_fn, a cycle through C++ that gc cannot break: each plan leaked part of a layer's graph
    (0.18 GiB at Llama-3.1-8B 2 x 2048 on an H100), counted as `fixed` by the next plan."""
    model = _model(model_dir, KernelsConfig(backend=backend))
    mode = _RetainedAllocations()
    with mode:
        plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=1024 * GIB)
    assert mode.storages and mode.retained_bytes() == 0


def test_generous_budget_checkpoints_nothing_and_cpu_default_has_no_budget(model):
    plan = plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=1024 * GIB)
    assert plan.checkpointed == () and plan.fits and plan.num_layers == LAYERS
    cpu_default = plan_recomputation(model, batch_size=B, seq_len=T)
    assert cpu_default.budget_bytes is None and cpu_default.checkpointed == ()
    assert "checkpoint 0/4 decoder layers" in str(plan) and plan.as_dict()["checkpointed_layers"] == 0


def test_tight_budget_checkpoints_the_smallest_k_that_fits(model, caplog):
    base = plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=1024 * GIB)
    peaks = [base.estimated_peak(k) for k in range(LAYERS + 1)]
    assert all(a > b for a, b in zip(peaks, peaks[1:], strict=False)), peaks  # each layer saves A - c > 0
    for want in range(1, LAYERS + 1):
        for budget in (peaks[want], (peaks[want] + peaks[want - 1]) // 2):
            plan = plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=budget)
            k = len(plan.checkpointed)
            assert k == want and plan.checkpointed == tuple(range(k)), (budget, plan)
            assert plan.estimated_peak() <= budget < plan.estimated_peak(k - 1)  # smallest k that fits
    with caplog.at_level(logging.WARNING, logger="distsft.recompute"):
        plan = plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=peaks[-1] - 1)
    assert plan.checkpointed == tuple(range(LAYERS)) and not plan.fits
    assert "exceeds the budget" in caplog.text


def test_estimate_terms(model):
    plan = plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=1024 * GIB)
    lm = model.causal_lm
    params = sum(p.numel() * 4 for p in lm.parameters())  # fp32, the tied embedding counted once below
    params -= lm.lm_head.weight.numel() * 4 if lm.lm_head.weight is lm.get_input_embeddings().weight else 0
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert plan.fixed_bytes == params + sum(b.numel() * b.element_size() for b in lm.buffers()) + 12 * trainable
    c = plan.checkpointed_layer_bytes
    vocab = lm.lm_head.weight.shape[0]
    assert plan.head_bytes == 2 * c + B * T * vocab * 4  # fused CE: one chunk, here all N rows
    # A packed batch's 4-D mask is an input every layer shares: counted once in `shared`, not per layer
    # (what SDPA saves with an explicit mask may differ, and is measured).
    mask = packed_attention_kwargs(torch.arange(T).expand(B, T), "sdpa", torch.float32)
    packed = plan_recomputation(model, batch_size=B, seq_len=T, budget_bytes=1024 * GIB, decoder_kwargs=mask)
    assert packed.shared_bytes - plan.shared_bytes == mask["attention_mask"].numel() * 4


def test_checkpointed_layers_give_identical_loss_and_gradients(model_dir):
    """Non-reentrant recomputation through transformers' per-layer switch, with our kernels: the first k
    layers run twice (forward, then again in backward), the rest once; loss and every LoRA gradient are
    bit-identical to the model without checkpointing; and the memory the forward keeps follows the
    planner's model: each further checkpointed layer keeps c instead of A."""
    ref, ckpt = _model(model_dir), _model(model_dir)
    batch = _batch()
    mask = {"attention_mask": batch["attention_mask"]}  # the planner sees the real batches' decoder inputs
    generous = plan_recomputation(ckpt, batch_size=B, seq_len=T, budget_bytes=1024 * GIB, decoder_kwargs=mask)
    plan = plan_recomputation(ckpt, batch_size=B, seq_len=T, budget_bytes=generous.estimated_peak(2),
                              decoder_kwargs=mask)
    assert plan.checkpointed == (0, 1)
    assert apply_recomputation(ckpt, plan) == 2
    assert [is_checkpointed(m) for m in decoder_layers(ckpt)] == [True, True, False, False]
    assert not any(m.gradient_checkpointing for m in decoder_layers(ckpt))  # transformers' switch stays off

    calls = [0] * LAYERS  # forward pre-hooks: non-reentrant recomputation stops early, after its last save
    outer = [0] * LAYERS  # the layer's own hooks (ZeRO-3 gathers there) stay outside the checkpoint: once
    for i, layer in enumerate(decoder_layers(ckpt)):
        layer.self_attn.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        layer.register_forward_pre_hook(lambda *a, i=i: outer.__setitem__(i, outer[i] + 1))

    def forward(m):
        mode = _RetainedAllocations()
        with mode:
            s, n = m(**batch)
        return s, n, mode.retained_bytes(exclude={s.untyped_storage().data_ptr(), n.untyped_storage().data_ptr()})

    s_ref, n_ref, kept_ref = forward(ref)
    s_ckpt, n_ckpt, kept_2 = forward(ckpt)
    (s_ref / n_ref).backward()
    (s_ckpt / n_ckpt).backward()
    assert calls == [2, 2, 1, 1] and outer == [1, 1, 1, 1]
    assert torch.equal(s_ref, s_ckpt) and torch.equal(n_ref, n_ckpt)
    grads = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for k, p in ckpt.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[k]), k

    apply_recomputation(ckpt, replace(plan, checkpointed=tuple(range(LAYERS))))
    *_, kept_all = forward(ckpt)
    a, c = plan.layer_activation_bytes, plan.checkpointed_layer_bytes
    assert kept_2 - kept_all == (LAYERS - 2) * (a - c)  # exact: layers 2 and 3 keep A, not c
    # No checkpointing: layer 0, whose input (the embedding output) needs no gradient, keeps a little less
    # than A, so the estimate for k = 0 is high by about c, never low.
    assert (LAYERS - 1) * (a - c) < kept_ref - kept_all <= LAYERS * (a - c)


def test_apply_is_exact_and_checks_the_plan(model_dir, model):
    m = _model(model_dir)
    m.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    none = plan_recomputation(m, batch_size=B, seq_len=T, budget_bytes=1024 * GIB)
    assert apply_recomputation(m, none) == 0  # overrides a model-wide setting: exactly the plan's layers
    assert not any(layer.gradient_checkpointing or is_checkpointed(layer) for layer in decoder_layers(m))
    with pytest.raises(ValueError, match="plan is for 3 decoder layers"):
        apply_recomputation(model, replace(none, num_layers=3))


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), ("auto", "auto"),
                                                 ("yes", True)])
def test_config_gradient_checkpointing_values(value, expected):
    cfg = load_config(overrides=[f"model.gradient_checkpointing={value}", "model.memory_budget_gib=70"])
    assert cfg.model.gradient_checkpointing == expected and cfg.model.memory_budget_gib == 70.0
    assert load_config().model.gradient_checkpointing is False and load_config().model.memory_budget_gib is None


def test_config_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"^model\.gradient_checkpointing: .*'sometimes'"):
        load_config(overrides=["model.gradient_checkpointing=sometimes"])
    with pytest.raises(ConfigError, match=r"^gradient_checkpointing: expected true, false or auto"):
        ModelConfig(gradient_checkpointing="full")
    with pytest.raises(ConfigError, match=r"^model\.memory_budget_gib: must be > 0"):
        load_config(overrides=["model.memory_budget_gib=0"])
