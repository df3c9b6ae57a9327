"""Checkpointed layers with host-offloaded inputs (`distsft.recompute`) give the uncheckpointed model's loss
and LoRA gradients exactly, including with dropout (the recompute replays the forward's RNG state)."""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import distsft.fused_lora as fused_lora
import distsft.patching as patching
from distsft.config import KernelsConfig
from distsft.recompute import device_checkpoint, offloaded_checkpoint

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)


def _models(dropout: float, fn=offloaded_checkpoint, kernels: KernelsConfig | None = None):
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                            init_lora_weights=False))
    plain = copy.deepcopy(model)
    if kernels is not None:
        patching.apply_kernels(model, kernels)
        patching.apply_kernels(plain, kernels)
    for layer in model.base_model.model.model.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = fn
    return model.train(), plain.train()


def _step(model, seed):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_checkpoint_matches_uncheckpointed(dropout):
    model, plain = _models(dropout)
    loss, grads = _step(model, seed=7)
    ref_loss, ref_grads = _step(plain, seed=7)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 7 * 2 * CONFIG["num_hidden_layers"]
    for name, g in grads.items():
        assert g is not None and g.abs().max() > 0, name  # layer 0 too: its input needs no grad
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=0, msg=name)
    if dropout:  # the replayed masks matter: another seed gives other gradients
        plain.zero_grad()
        _, other = _step(plain, seed=8)
        assert any(not torch.equal(other[n], ref_grads[n]) for n in other)


def test_only_hidden_states_may_require_grad():
    h = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="only the hidden states"):
        offloaded_checkpoint(lambda x, y: x + y, h, torch.randn(2, 3, requires_grad=True))


@pytest.mark.parametrize("fn", [offloaded_checkpoint, device_checkpoint])
def test_patched_recompute_skips_the_down_projection(fn, monkeypatch):
    """With our kernels (fused LoRA, patched MLP) the recompute computes the down projection's LoRA input
    but not its output; loss and gradients still equal the uncheckpointed patched model's."""
    calls = []
    real = fused_lora.fused

    def spy(x, modules, values_unused=False, **kw):
        calls.append(values_unused)
        return real(x, modules, values_unused, **kw)

    monkeypatch.setattr(fused_lora, "fused", spy)
    model, plain = _models(0.0, fn, KernelsConfig())
    loss, grads = _step(model, seed=7)
    layers = CONFIG["num_hidden_layers"]
    assert calls.count(True) == layers  # one skipped down projection per recomputed layer
    ref_loss, ref_grads = _step(plain, seed=7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
def test_offload_streams_on_cuda():
    """The CUDA path: copies on the side stream, prefetch one layer ahead, record_stream. Exact against the
    uncheckpointed model over two steps (the second reuses the pinned host blocks of the first)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, plain = _models(0.0)
    model, plain = model.cuda(), plain.cuda()
    ids = torch.randint(0, 128, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for _ in range(2):
        for m in (model, plain):
            m.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.gpu
def test_offload_backward_holds_no_input_while_the_host_runs_ahead():
    """Regression: the backward's prefetched inputs were allocated on the copy stream and `record_stream`ed
    on the compute stream, so each one's memory stayed held (in the copy stream's pool, reserved, unusable
    by the compute stream) until the GPU had got past its layer. The host runs layers ahead of the GPU in
    the backward (8 x 32 MiB held at the 8B QLoRA step's peak, 0.3 GiB more reserved); here the compute
    stream is held back by a sleep so that the host enqueues the whole backward first. The memory the
    backward needs must not depend on how far ahead the host is."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    layers, batch, seq, hidden = 8, 16, 512, 512  # short rows: the GPU keeps up with the host unless held back
    cfg = dict(CONFIG, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers)
    base = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg))
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).cuda().train()
    for layer in model.base_model.model.model.layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = offloaded_checkpoint
    ids = torch.randint(0, 128, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    input_bytes = batch * seq * hidden * 4  # one layer's saved input (fp32): 16 MiB

    def backward_reserved(host_ahead: bool) -> int:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_reserved()
        if host_ahead:
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles: the backward is enqueued meanwhile
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved() - start

    backward_reserved(False)  # warm-up: pinned blocks, kernels
    in_step, ahead = backward_reserved(False), backward_reserved(True)
    assert ahead - in_step < 2 * input_bytes, (in_step, ahead, input_bytes)
