"""Put our kernels into one HF model instance, countably and reversibly.

    report = apply_kernels(peft_model, cfg.kernels)   # RMSNorm, RoPE, SwiGLU/GeGLU, fused LoRA on this instance
    with record_kernels() as census:                  # what actually runs (distsft/census.py)
        loss = model(batch); loss.backward()
    logger.info("%s", census.summary(report))
    revert_kernels(peft_model, report)                # the original forwards, exactly

Patching binds a forward to each matched module *instance* (`module.forward = MethodType(...)`); the
transformers classes and module-level functions are never touched, no source is rewritten. Modules
keep their parameters, so state dicts, peft adapters (LoRA layers inside q_proj etc. are called as HF
calls them) and DeepSpeed hooks are unaffected. RoPE lives inside attention, so attention modules get a
forward that mirrors HF's (same projections, same attention interface from `ALL_ATTENTION_FUNCTIONS`
with the module's own eager fallback, same sliding-window and soft-capping arguments) with the rotation
swapped. The replacements are counted and checked against the architecture.

Each bound forward chooses its backend per call from the tensor's device (`census.use_triton`) and notes
the path it took in the kernel census (distsft/census.py). peft's LoRA layers get the fused projections
of distsft/fused_lora.py, decided per call too (a projection whose weights are not whole in this process
right now keeps peft's forward); the LM head's loss is chosen in distsft/loss.py.
"""

from __future__ import annotations

import logging
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import distsft_kernels as K
import torch
from distsft_kernels.reference import rms_norm_ref, rope_ref

from distsft import census, fused_lora, qlora
from distsft.census import TAG
from distsft.config import KernelsConfig
from distsft.recompute import recomputing

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass(frozen=True)
class _Arch:
    norm_casting: str = "llama"  # "llama": w * xhat.to(dtype); "gemma": ((1 + w) * xhat).to(dtype)
    norms_per_layer: int = 2  # RMSNorms per decoder layer (+1 final norm)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before the rotation
    sliding: str | None = None  # where attention's `sliding_window` comes from: "config" | "module"
    attn_softcap: bool = False  # Gemma2: `softcap=self.attn_logit_softcapping`
    mlp_to_residual: bool = True  # the MLP's output goes straight into the residual sum (no post-norm)


ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch(),
    "mistral": _Arch(sliding="config"),
    "qwen2": _Arch(sliding="module"),
    "qwen3": _Arch(norms_per_layer=4, qk_norm=True, sliding="module"),
    "gemma": _Arch(norm_casting="gemma"),
    "gemma2": _Arch(norm_casting="gemma", norms_per_layer=4, sliding="module", attn_softcap=True,
                    mlp_to_residual=False),
}


@dataclass(frozen=True)
class _Spec:
    """What a bound forward needs besides its module."""

    backend: str
    casting: str = "llama"
    activation: str = "silu"
    arch: _Arch | None = None
    eager: Callable | None = None
    dequantize_4bit: bool = False  # LoRA layers on 4-bit bases: our dequantization kernel
    spare_cols: int = 0  # RMSNorm feeding a fused 4-bit LoRA group: room after each output row for its mid
    name: str = ""  # the module's logical name (for the census)


@dataclass
class PatchReport:
    """What `apply_kernels` replaced: counts per kernel (checked against `expected`), and how to undo it."""

    model_type: str
    backend: str
    counts: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None  # why nothing was patched (on_unsupported="warn")
    _undo: list = field(default_factory=list, repr=False)
    _model: Callable | None = field(default=None, repr=False)  # weakref to the patched HF model

    def as_dict(self) -> dict:
        return {"model_type": self.model_type, "backend": self.backend, "counts": dict(self.counts),
                "skipped": self.skipped}

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.model_type}: none ({self.skipped})"
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items()) or "none"
        return f"{self.model_type}: {counts} (backend {self.backend})"


# ----------------------------------------------------------------------------------------------------
# The bound forwards (self is the HF module instance); the fused LoRA layers' is fused_lora.lora_forward


def _rms_norm_forward(self, hidden_states):
    spec = getattr(self, TAG)
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    offset = 1.0 if spec.casting == "gemma" else 0.0
    triton = census.use_triton(spec.backend, hidden_states)
    census.note_backend("rms_norm", spec, triton, hidden_states)
    # Its own weight, from the parameter dict: under ZeRO-3 `self.weight` goes through DeepSpeed's gathering
    # getter on every call, and the module's weight is already whole when its forward runs (a norm is
    # persistent, or gathered by DeepSpeed's pre-forward hook, or with its decoder layer).
    weight = dict.get(self._parameters, "weight")
    if weight is None:  # not a registered parameter of this module
        weight = self.weight
    if triton:
        return K.rms_norm(hidden_states, weight, eps, offset=offset, casting=spec.casting,
                          spare_cols=spec.spare_cols)
    return rms_norm_ref(hidden_states, weight, eps, offset=offset, casting=spec.casting)


def _mlp_forward(self, x):
    spec = getattr(self, TAG)
    # HF's order (matters for LoRA dropout's RNG)
    gate, up = fused_lora.projections(x, (self.gate_proj, self.up_proj))
    triton = census.use_triton(spec.backend, gate)
    census.note_backend("swiglu", spec, triton, gate)
    if triton:
        # gate and up are ours (fresh projection outputs, read by nothing else): their memory takes the grads
        h = K.gated_activation(gate, up, spec.activation, inplace_grads=True)
    else:
        h = self.act_fn(gate) * up
    if (spec.arch is not None and spec.arch.mlp_to_residual and recomputing()
            and fused_lora.unfused_reason(self.down_proj) is None):
        # A checkpointed layer's recompute: this output only feeds the residual sum leaving the layer,
        # whose value backward never reads; skip its GEMMs (distsft/recompute.py).
        return fused_lora.fused(h, (self.down_proj,), values_unused=True)[0]
    return self.down_proj(h)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    """HF's Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma2 attention forward with the rotation swapped."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    spec = getattr(self, TAG)
    arch = spec.arch
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = fused_lora.projections(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    if arch.qk_norm:
        query_states = self.q_norm(q.view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(k.view(hidden_shape)).transpose(1, 2)
    else:
        query_states = q.view(hidden_shape).transpose(1, 2)  # (B, Hq, T, D)
        key_states = k.view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)
    value_states = v.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings  # (B|1, T, D) from the model's rotary embedding (any rope variant)
    triton = census.use_triton(spec.backend, query_states)
    census.note_backend("rope", spec, triton, query_states)
    if triton:
        dup = self.__dict__.get("_distsft_rope_duplicated")
        if dup is None:  # HF builds cos/sin as cat(f, f): checked once per module (one sync), then trusted
            h = cos.shape[-1] // 2
            dup = bool(torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:]))
            self.__dict__["_distsft_rope_duplicated"] = dup
        # in place, one launch; reading only the first halves of cos/sin where they repeat
        query_states, key_states = K.rope(query_states, key_states, cos, sin, duplicated_halves=dup)
    else:
        query_states, key_states = rope_ref(query_states, key_states, cos, sin)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    extra = {}
    if arch.sliding == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif arch.sliding == "module":
        extra["sliding_window"] = self.sliding_window
    if arch.attn_softcap:
        extra["softcap"] = self.attn_logit_softcapping
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, spec.eager)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **extra, **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


# ----------------------------------------------------------------------------------------------------
# Finding and binding


def _hf_model(model):
    """The HF causal LM inside a peft `PeftModel` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _logical_name(name: str) -> str:
    """peft's `modules_to_save` keeps two copies of a module: count them once."""
    parts, out, skip = name.split("."), [], 0
    for p in parts:
        if skip:
            skip -= 1
        elif p == "original_module":
            continue
        elif p == "modules_to_save":
            skip = 1  # the adapter name follows
        else:
            out.append(p)
    return ".".join(out)


def _bind(module, fn, spec: _Spec, undo: list) -> None:
    if hasattr(module, TAG):
        raise ValueError(f"{type(module).__name__} is already patched: revert_kernels first")
    # accelerate's hooks (device_map) wrap `forward` and call `_old_forward`: replace the inner one.
    attr = "_old_forward" if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__ else "forward"
    undo.append((module, attr, module.__dict__.get(attr, _MISSING)))
    setattr(module, TAG, spec)
    setattr(module, attr, types.MethodType(fn, module))


def _activation(act_fn) -> str | None:
    from transformers.activations import GELUTanh, SiLUActivation

    if isinstance(act_fn, (SiLUActivation, torch.nn.SiLU)):
        return "silu"
    if isinstance(act_fn, GELUTanh):
        return "gelu_tanh"
    return None


def _is(m, suffix: str, *attrs: str) -> bool:
    return type(m).__name__.endswith(suffix) and all(hasattr(m, a) for a in attrs)


def apply_kernels(model, cfg: KernelsConfig) -> PatchReport:
    """Patch RMSNorm / RoPE / SwiGLU (per `cfg`) on this model instance (a peft model or a bare HF model).

    Raises ValueError for an unsupported architecture (or logs a warning and patches nothing with
    `on_unsupported="warn"`), RuntimeError when the counts do not match the architecture (nothing is
    left patched then).
    """
    hf = _hf_model(model)
    model_type = getattr(hf.config, "model_type", type(hf).__name__)
    report = PatchReport(model_type=model_type, backend=cfg.backend, _model=weakref.ref(hf))
    if cfg.backend == "triton" and not K.HAS_TRITON:
        raise ValueError("kernels.backend: 'triton' needs the triton package, which is not installed")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        msg = (f"kernels: model_type {model_type!r} is not supported by distsft's kernel patching "
               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        if cfg.on_unsupported == "error":
            raise ValueError(msg + "; set kernels.on_unsupported=warn to train without the kernels")
        logger.warning("%s; training with the plain HF modules", msg)
        report.skipped = "unsupported architecture"
        return report

    n_layers = hf.config.num_hidden_layers
    wanted = {"rms_norm": cfg.rms_norm, "rope": cfg.rope, "swiglu": cfg.swiglu}
    report.expected = {k: n for k, n in (("rms_norm", arch.norms_per_layer * n_layers + 1),
                                         ("rope", n_layers), ("swiglu", n_layers)) if wanted[k]}
    lora_layers = _lora_layers(hf) if cfg.lora and cfg.backend != "torch" else {}
    if lora_layers:
        # Expected: every LoRA projection the adapter put into this model. Ones the fused path cannot
        # compute (a variant, dropout, several adapters) are named here and keep peft's forward.
        unfused = {n: why for n, (_, why) in lora_layers.items() if why is not None}
        if unfused:
            reasons = sorted(set(unfused.values()))
            logger.warning("kernels.lora: %d of %d LoRA layers keep peft's forward (%s)", len(unfused),
                           len(lora_layers), "; ".join(reasons))
        report.expected["lora"] = len(lora_layers) - len(unfused)
    seen: dict[str, set] = {k: set() for k in report.expected}
    undo = report._undo
    try:
        for name, (m, why) in lora_layers.items():
            if why is None:
                _bind(m, fused_lora.lora_forward, _Spec(cfg.backend, activation="lora",
                                                        dequantize_4bit=cfg.dequantize_4bit, name=name), undo)
                seen["lora"].add(name)
        for name, m in hf.named_modules():
            if cfg.rms_norm and _is(m, "RMSNorm", "weight"):
                spare = _spare_cols(_logical_name(name), lora_layers, cfg)
                _bind(m, _rms_norm_forward, _Spec(cfg.backend, casting=arch.norm_casting, spare_cols=spare,
                                                  name=_logical_name(name)), undo)
                seen["rms_norm"].add(_logical_name(name))
            elif cfg.rope and _is(m, "Attention", "q_proj", "k_proj", "v_proj", "o_proj", "head_dim"):
                eager = getattr(sys.modules[type(m).__module__], "eager_attention_forward", None)
                if eager is None:
                    raise RuntimeError(f"{type(m).__module__} has no eager_attention_forward")
                _bind(m, _attention_forward, _Spec(cfg.backend, arch=arch, eager=eager, name=_logical_name(name)),
                      undo)
                seen["rope"].add(_logical_name(name))
            elif cfg.swiglu and _is(m, "MLP", "gate_proj", "up_proj", "down_proj", "act_fn"):
                act = _activation(m.act_fn)
                if act is None:
                    msg = (f"kernels.swiglu: {model_type} MLP activation {type(m.act_fn).__name__} has no "
                           "fused kernel (silu and gelu_pytorch_tanh do)")
                    if cfg.on_unsupported == "error":
                        raise ValueError(msg + "; set kernels.swiglu=false")
                    logger.warning("%s; keeping the HF MLP", msg)
                    report.expected["swiglu"] = 0
                    continue
                _bind(m, _mlp_forward, _Spec(cfg.backend, activation=act, arch=arch, name=_logical_name(name)), undo)
                seen["swiglu"].add(_logical_name(name))
        report.counts = {k: len(v) for k, v in seen.items()}
        if report.counts != report.expected:
            raise RuntimeError(f"kernels: patched {report.counts} modules in this {model_type} model, "
                               f"expected {report.expected} for {n_layers} layers; nothing left patched")
    except Exception:
        _undo(undo)
        raise
    logger.info("kernels patched: %s", report)
    return report


_NORM_FEEDS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
               "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj")),  # Llama, Mistral, Qwen
               "pre_feedforward_layernorm": ("mlp", ("gate_proj", "up_proj"))}  # Gemma 2/3
"""A decoder layer's norm -> the projection group that reads its output (by HF's module names). Gemma 2/3's
post_attention_layernorm normalises the attention's output instead: its spare columns go unused there."""


def _spare_cols(norm_name: str, lora_layers: dict, cfg: KernelsConfig) -> int:
    """Columns to leave after each row of this norm's output: the rank sum R of the fused LoRA group on
    4-bit bases that reads it (its [x | mid] operand is then built on the norm's output, no copy of x;
    kernels/distsft_kernels/lora.py), where the attention (rope) or MLP (swiglu) forward is ours and calls the group as
    one. 0 where no such group follows (the columns would go unused; nothing else)."""
    prefix, _, leaf = norm_name.rpartition(".")
    if leaf not in _NORM_FEEDS:
        return 0
    parent, projs = _NORM_FEEDS[leaf]
    if not (cfg.rope if parent == "self_attn" else cfg.swiglu):
        return 0
    group = [lora_layers.get(f"{prefix}.{parent}.{p}") for p in projs]
    if any(g is None or g[1] is not None or not qlora.is_4bit(g[0].get_base_layer()) for g in group):
        return 0
    key = group[0][0].active_adapters[0]
    return sum(m.lora_A[key].weight.shape[0] for m, _ in group)


def _lora_layers(hf) -> dict[str, tuple]:
    """{logical name: (peft LoRA Linear layer, reason it cannot be fused or None)}."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, m in hf.named_modules():
        if isinstance(m, LoraLayer) and type(m).__name__ in ("Linear", "Linear4bit") and hasattr(m, "lora_A"):
            found[_logical_name(name)] = (m, fused_lora.static_reason(m))
    return found


def _undo(undo: list) -> None:
    for module, attr, previous in reversed(undo):
        if previous is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, previous)
        module.__dict__.pop(TAG, None)
    undo.clear()


def revert_kernels(model, report: PatchReport) -> None:
    """Restore the forwards `apply_kernels` replaced on this model (the classes' own, or what was bound)."""
    hf = _hf_model(model)
    if report._model is not None and report._model() is not hf:
        raise ValueError("revert_kernels: this report belongs to another model instance")
    _undo(report._undo)
    report.counts = {k: 0 for k in report.counts}
