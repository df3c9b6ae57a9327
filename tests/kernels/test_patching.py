"""`distsft.patching` on tiny models of every supported architecture, wrapped with peft LoRA, against an
unpatched deep copy: counts, logits, loss, every LoRA gradient, 20 AdamW steps, revert, error paths."""

import copy
import logging

import pytest
import torch
import transformers
from kernel_tolerances import DEVICE, assert_model_close
from peft import LoraConfig, get_peft_model

from distsft.census import use_triton
from distsft.config import KernelsConfig
from distsft.loss import select_loss_fn
from distsft.patching import ARCHITECTURES, apply_kernels, revert_kernels

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy exp, interpreter

LAYERS = 2
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
CONFIGS = {  # model_type -> (config, attention implementation)
    "llama": (lambda: transformers.LlamaConfig(**COMMON), "sdpa"),
    "mistral": (lambda: transformers.MistralConfig(**COMMON, sliding_window=6), "sdpa"),
    "qwen2": (lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6,
                                               max_window_layers=1), "sdpa"),
    "qwen3": (lambda: transformers.Qwen3Config(**COMMON), "sdpa"),
    "gemma": (lambda: transformers.GemmaConfig(**COMMON), "sdpa"),
    # eager: the attention soft-capping (50) is only applied by the eager path
    "gemma2": (lambda: transformers.Gemma2Config(**COMMON, sliding_window=6, query_pre_attn_scalar=16,
                                                 attn_logit_softcapping=5.0), "eager"),
}
LORA = 7 * LAYERS  # q, k, v, o, gate, up, down: "all-linear" adapts every projection of every layer
EXPECTED = {  # written out per architecture, not derived from the patcher's own table
    "llama": {"lora": LORA, "rms_norm": 2 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS},
    "mistral": {"lora": LORA, "rms_norm": 2 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS},
    "qwen2": {"lora": LORA, "rms_norm": 2 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS},
    "qwen3": {"lora": LORA, "rms_norm": 4 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS},  # + q_norm, k_norm
    "gemma": {"lora": LORA, "rms_norm": 2 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS},
    "gemma2": {"lora": LORA, "rms_norm": 4 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS},  # + pre/post ffn
}


def _lora_model(arch, **config_overrides):
    make, attn = CONFIGS[arch]
    config = make()
    config.use_cache = False  # as the trainer does; with a cache HF builds packed-sequence masks differently
    for k, v in config_overrides.items():
        setattr(config, k, v)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    # init_lora_weights=False: B is random too, so that every LoRA parameter gets a gradient
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False)).to(DEVICE)


def _batch(step=0):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    # packed rows: documents of 7 and 5 tokens, positions restart at 0
    pos = torch.cat([torch.arange(7), torch.arange(5)]).expand(2, 12)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    return {k: v.to(DEVICE) for k, v in dict(input_ids=ids, position_ids=pos, labels=labels).items()}


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _run_step(model):
    model.zero_grad(set_to_none=True)
    out = model(**_batch())
    out.loss.backward()
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_patched_model_matches_hf(arch):
    assert set(ARCHITECTURES) == set(CONFIGS)
    model = _lora_model(arch)
    hf = copy.deepcopy(model)
    report = apply_kernels(model, KernelsConfig())
    assert report.counts == EXPECTED[arch]

    out, ref = _run_step(model), _run_step(hf)
    assert_model_close(f"{arch} logits", out.logits, ref.logits)
    assert_model_close(f"{arch} loss", out.loss, ref.loss)
    # every architecture's rotary embedding repeats its halves: the kernel reads only the first ones
    key = "_distsft_rope_duplicated"
    seen = [m.__dict__[key] for m in model.modules() if key in m.__dict__]
    assert seen and all(d is True for d in seen), seen
    grads, ref_grads = _lora_grads(model), _lora_grads(hf)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert g is not None and ref_grads[name].abs().max() > 0, name
        assert_model_close(f"{arch} grad {name}", g, ref_grads[name])

    # Reverting restores HF's forwards exactly: bitwise equal to the copy that was never patched.
    revert_kernels(model, report)
    assert not any("forward" in m.__dict__ or hasattr(m, "_distsft_kernel") for m in model.modules())
    with torch.no_grad():
        batch = _batch()
        assert torch.equal(model(**batch).logits, hf(**batch).logits)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_loss_curve_20_adamw_steps(arch):
    model = _lora_model(arch)
    hf = copy.deepcopy(model)
    apply_kernels(model, KernelsConfig())
    curves = []
    for m in (model, hf):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for step in range(20):
            opt.zero_grad(set_to_none=True)
            loss = m(**_batch(step % 2)).loss  # two batches, alternating: it must learn them
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        curves.append(torch.stack(losses))
    assert curves[1][-1] < curves[1][0]  # it trains
    assert_model_close(f"{arch} loss curve", curves[0], curves[1])


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_torch_backend_is_bitwise_hf(arch):
    """Backend `torch` runs the references through our bound forwards: identical to HF, bit for bit,
    which also checks that the attention forward mirrors HF's (projections, sliding window, softcap)."""
    model = _lora_model(arch)
    hf = copy.deepcopy(model)
    apply_kernels(model, KernelsConfig(backend="torch"))
    out, ref = _run_step(model), _run_step(hf)
    assert torch.equal(out.logits, ref.logits)
    for name, g in _lora_grads(model).items():
        assert torch.equal(g, _lora_grads(hf)[name]), name


def test_flags_bare_model_gradient_checkpointing_and_double_patch():
    model = _lora_model("llama").get_base_model()  # a bare HF model works too
    hf = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    report = apply_kernels(model, KernelsConfig(rope=False))
    assert report.counts == {"lora": LORA, "rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS}
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    out, ref = _run_step(model), _run_step(hf)
    assert_model_close("checkpointed loss", out.loss, ref.loss)
    for name, g in _lora_grads(model).items():
        assert_model_close(f"checkpointed grad {name}", g, _lora_grads(hf)[name])
    with pytest.raises(ValueError, match="already patched"):
        apply_kernels(model, KernelsConfig())
    assert report.counts == {"lora": LORA, "rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS}  # failed call undid itself
    revert_kernels(model, report)
    with pytest.raises(ValueError, match="another model"):
        revert_kernels(hf, apply_kernels(model, KernelsConfig()))


def test_unsupported_architecture_error_and_warn(caplog):
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).to(DEVICE)
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*gemma, gemma2, llama, mistral, qwen2, qwen3"):
        apply_kernels(model, KernelsConfig())
    with caplog.at_level(logging.WARNING, logger="distsft.patching"):
        report = apply_kernels(model, KernelsConfig(on_unsupported="warn"))
    assert "gpt2" in caplog.text and report.skipped and report.counts == {}
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_unsupported_activation_error_and_warn(caplog):
    with pytest.raises(ValueError, match="kernels.swiglu"):
        apply_kernels(_lora_model("llama", hidden_act="relu"), KernelsConfig())
    model = _lora_model("llama", hidden_act="relu")
    with caplog.at_level(logging.WARNING, logger="distsft.patching"):
        report = apply_kernels(model, KernelsConfig(on_unsupported="warn"))
    assert report.counts["swiglu"] == 0 and report.counts["rms_norm"] == 2 * LAYERS + 1


def test_triton_backend_insists():
    with pytest.raises(RuntimeError, match="backend=triton"):
        use_triton("triton", torch.empty(1, device="meta"))
    assert not use_triton("auto", torch.empty(1, device="meta"))
    assert not use_triton("torch", torch.empty(1))


@pytest.mark.parametrize("kind", ["fused", "ce", "reference"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: final logit soft-capping
def test_loss_fn_matches_hf_loss(kind, arch):
    model = _lora_model(arch)
    apply_kernels(model, KernelsConfig(rope=False, swiglu=False))
    cfg = KernelsConfig(fused_linear_cross_entropy=kind == "fused", cross_entropy=kind == "ce")
    loss_fn = select_loss_fn(cfg)
    causal_lm = model.get_base_model()
    batch = _batch()

    hidden = causal_lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), d): row i predicts token i+1
    targets = batch["labels"][:, 1:].reshape(-1)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    loss_sum, n = loss_fn(hidden, causal_lm.lm_head.weight, targets, softcap=softcap)
    assert n.item() == int((targets != -100).sum())
    (loss_sum / n).backward()
    grads = {k: g.clone() for k, g in _lora_grads(model).items()}

    model.zero_grad(set_to_none=True)
    hf_loss = model(**batch).loss  # HF ForCausalLMLoss: shift, fp32, mean over targets
    hf_loss.backward()
    assert_model_close(f"{kind} loss", loss_sum / n, hf_loss)
    for name, g in _lora_grads(model).items():
        assert_model_close(f"{kind} grad {name}", grads[name], g)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_kernels_under_hf_gradient_checkpointing_match_hf(arch):
    """With HF's own gradient checkpointing on (transformers applies it in the layer's `__call__` or, in
    later versions, by wrapping the class's `forward`), the patched model's loss and every LoRA gradient
    match HF's."""
    model = _lora_model(arch)
    hf = copy.deepcopy(model)
    for m in (model, hf):
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    report = apply_kernels(model, KernelsConfig())
    out, ref = _run_step(model), _run_step(hf)
    assert_model_close(f"{arch} loss", out.loss, ref.loss)
    for name, g in _lora_grads(model).items():
        assert_model_close(f"{arch} grad {name}", g, _lora_grads(hf)[name])
    revert_kernels(model, report)


def test_small_lora_updates_survive_the_residual_sum():
    """Regression: the o and down projections once read the residual in their fused base GEMM (a patched
    decoder layer handed it to them) and then added the LoRA update s (x A^T) B^T to that sum, already
    rounded to the residual stream's bf16 grid, so updates under half an ulp of the residual were rounded
    away (always towards "no update"). A fresh adapter after Adam's first step (B = +-lr) lost much of its
    o/down update: on a Llama-3.2-1B shape the step-2 loss was 0.02 above peft's forward and fp32, which
    ZeRO-3 (where the fused path is off) matched.

    One bf16 Llama decoder layer with a residual stream ten times its projections' outputs and B = +-1e-3 on
    the o and down projections: the change the adapters make to the layer's output, projected on the fp32
    change, is kept as by peft's own bf16 forward (~1.0; the fused residual sum kept 0.54-0.62)."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and ("o_proj" in n or "down_proj" in n):  # Adam's first step from B = 0: +-lr
                p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.5, -1e-3, 1e-3))
    fp32, peft_bf16 = copy.deepcopy(model).float(), copy.deepcopy(model)
    report = apply_kernels(model, KernelsConfig())
    assert report.counts["lora"] == 7  # every projection of the layer takes the fused path

    h = (0.2 * torch.randn(2, 64, 128, generator=g)).to(DEVICE)  # o/down outputs have rms ~0.01-0.02 here
    pos = torch.arange(64, device=DEVICE).expand(2, -1)

    def lora_change(m, dtype):
        inner = m.get_base_model().model
        x = h.to(dtype)
        pe = inner.rotary_emb(x, pos)
        with torch.no_grad():
            with_lora = inner.layers[0](x, position_embeddings=pe, position_ids=pos)
            with m.disable_adapter():
                without = inner.layers[0](x, position_embeddings=pe, position_ids=pos)
        return (with_lora.double() - without.double()).flatten()

    exact = lora_change(fp32, torch.float32)
    kept = {name: float(lora_change(m, torch.bfloat16) @ exact / (exact @ exact))
            for name, m in (("peft", peft_bf16), ("fused", model))}
    assert kept["peft"] >= 0.9, kept  # what bf16 allows
    assert kept["fused"] >= 0.9, kept


# ----------------------------------------------------------------------------------------------------
# The kernel census: what ran, not what was patched (issue 18)


def test_census_counts_what_ran_and_names_each_fallback():
    """`record_kernels` counts the path each bound forward took: every patched module of a plain LoRA model
    runs ours (Triton, or the interpreter here; the LoRA groups fused), and a LoRA layer that carries a
    module hook (what DeepSpeed ZeRO-3's per-module gathering puts on it) runs peft's forward, named with
    the reason. Before, `apply_kernels`' report counted the patched layers whatever ran."""
    from distsft.census import record_kernels

    model = _lora_model("llama")
    report = apply_kernels(model, KernelsConfig())
    with record_kernels() as census:
        _run_step(model)
    assert census.missing(report) == {}, census.counts()
    assert census.counts()["lora"] == {"fused": LORA}
    assert census.groups == {"q_proj+k_proj+v_proj": LAYERS, "o_proj": LAYERS, "gate_proj+up_proj": LAYERS,
                             "down_proj": LAYERS}
    hooked = model.get_base_model().model.layers[1].self_attn.k_proj
    handle = hooked.register_forward_pre_hook(lambda m, args: None)
    try:
        with record_kernels() as census:
            _run_step(model)
    finally:
        handle.remove()
    # k_proj falls back, so its group (q, k, v) is called module by module: q and v still run fused alone
    assert census.counts()["lora"] == {"fused": LORA - 1, "peft": 1}
    assert census.missing(report) == {"lora": 1}
    assert list(census.fallbacks) == ["model.layers.1.self_attn.k_proj"]
    assert "hooks run on the module itself" in census.fallbacks["model.layers.1.self_attn.k_proj"]
    (warning,) = census.fallback_warnings()
    assert "1 LoRA layer(s) ran peft's forward" in warning and "model.layers.1.self_attn.k_proj" in warning
    assert "lora 13/14 (fused 13, peft 1)" in census.summary(report)


def test_fused_path_follows_adapter_changes_after_its_lookup_is_cached():
    """`fused_lora` caches each LoRA layer's (adapter, base, lora_A, lora_B) after the first call; the cache
    must follow the adapter set: a second adapter made active, adapters disabled, and an adapter module
    replaced under the same name each change what runs, as peft's own forward would."""
    from distsft import fused_lora
    from distsft.census import record_kernels

    model = _lora_model("llama")
    apply_kernels(model, KernelsConfig())
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    _run_step(model)  # caches every layer's lookup
    assert fused_lora.unfused_reason(q) is None

    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert fused_lora.unfused_reason(q) == "another adapter is active"  # two adapters on the layer now
    model.base_model.set_adapter("second")
    with record_kernels() as census:
        _run_step(model)
    assert census.counts()["lora"] == {"peft": LORA}
    model.delete_adapter("second")
    model.base_model.set_adapter("default")
    assert fused_lora.unfused_reason(q) is None

    with model.disable_adapter():
        assert fused_lora.unfused_reason(q) == "the adapter is disabled or merged"

    fresh = torch.nn.Linear(q.lora_A["default"].in_features, 4, bias=False).to(DEVICE)
    torch.nn.init.normal_(fresh.weight)
    q.lora_A["default"] = fresh  # a new module under the same adapter name: the fused path reads it
    x = torch.randn(3, fresh.in_features, device=DEVICE)
    torch.testing.assert_close(fused_lora.lora_forward(q, x), type(q).forward(q, x), rtol=1e-4, atol=1e-4)


def test_census_names_the_reference_backend():
    """`kernels.backend=torch` runs the references: counted as such, with the reason in the warning."""
    from distsft.census import record_kernels

    model = _lora_model("llama")
    report = apply_kernels(model, KernelsConfig(backend="torch"))
    with record_kernels() as census:
        _run_step(model)
    assert census.missing(report) == {"rms_norm": 2 * LAYERS + 1, "rope": LAYERS, "swiglu": LAYERS}
    assert census.counts()["rms_norm"] == {"torch": 2 * LAYERS + 1}
    assert any("kernels.backend=torch" in w for w in census.fallback_warnings())
    assert "lora" not in report.counts  # the torch backend keeps peft's LoRA layers unpatched


def test_pretrained_model_keeps_our_forwards_through_train(tmp_path):
    """Regression: with the `kernels` package installed (bitsandbytes pulls it in), transformers 5.2x
    `from_pretrained` kernelizes its hub-decorated modules again at every `train()`/`eval()` switch, which
    removed the RMSNorm forward distsft bound to each instance: the trainer's `model.train()` silently put
    transformers' RMSNorm back (the kernel census of a QLoRA run found it). A model built from a saved
    checkpoint, switched to training, runs every patched kernel."""
    from distsft.census import record_kernels
    from distsft.config import LoraConfig, ModelConfig
    from distsft.model import build_model

    make, _ = CONFIGS["llama"]
    transformers.AutoModelForCausalLM.from_config(make()).save_pretrained(tmp_path / "saved")
    model, report = build_model(ModelConfig(name_or_path=str(tmp_path / "saved"), dtype="float32",
                                            attn_implementation="eager"),
                                LoraConfig(r=4), KernelsConfig(), DEVICE, seed=0)
    model.eval()
    model.train()
    batch = _batch()
    targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    with record_kernels() as census:
        loss_sum, _ = model(input_ids=batch["input_ids"], target_ids=targets, position_ids=batch["position_ids"])
        loss_sum.backward()
    assert census.missing(report) == {}, census.counts()
