"""Put our kernels into one HF model instance, countably and reversibly; choose the loss function.

    report = apply_kernels(peft_model, cfg.kernels)   # RMSNorm, RoPE, SwiGLU/GeGLU on this instance
    loss_fn = select_loss_fn(cfg.kernels)             # (hidden, weight, targets, *, bias, softcap) -> (sum, n)
    with record_kernels() as census:                  # what actually runs (the trainer's first step)
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

Backend, decided per call from the tensor's device: `auto` runs Triton where it can (CUDA tensors, or
CPU tensors when the kernels were loaded under TRITON_INTERPRET=1) and the PyTorch references of
`distsft_kernels.reference` elsewhere; `triton` raises where Triton cannot run; `torch` always uses the
references (which reproduce the HF modules' numerics). The fused LoRA path is also decided per call
(`_lora_unfused_reason`): a projection whose weights are not whole in this process right now (DeepSpeed
ZeRO-3 with per-module gathering, accelerate's offload hooks) keeps peft's forward.

What was patched is not what runs: `record_kernels()` counts, per module, which path each bound
forward took while it is open (the trainer opens it for its first optimizer step), and
`KernelCensus.summary` / `as_dict` report it against the patch report, naming the reason of every layer
that fell back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import distsft_kernels as K
import torch
import torch.nn.functional as F
from distsft_kernels.reference import fused_linear_cross_entropy_ref, rms_norm_ref, rope_ref

from distsft.config import KernelsConfig
from distsft.offload import recomputing

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_MISSING = object()
_TAG = "_distsft_kernel"  # per-instance settings read by the bound forwards


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
# The census: what ran, per module


class KernelCensus:
    """Which path each patched module took while recording: {kernel: {path: {module names}}}, plus the
    reason of every LoRA layer that ran peft's forward and the fused groups (projection names joined by
    '+'). Paths: "triton" (our kernel), "torch" (the PyTorch reference), "fused" / "peft" (LoRA),
    "bitsandbytes" (4-bit dequantization by bitsandbytes), "fused_linear_ce" / "ce" / "reference" (loss)."""

    def __init__(self):
        self.ran: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.fallbacks: dict[str, str] = {}  # LoRA layer -> why it ran peft's forward
        self.groups: Counter = Counter()  # "q_proj+k_proj+v_proj" -> fused calls
        self.why_reference: str | None = None  # why a Triton kernel ran its PyTorch reference

    def note(self, kernel: str, path: str, name: str) -> None:
        self.ran[kernel][path].add(name)

    def counts(self) -> dict[str, dict[str, int]]:
        return {k: {p: len(names) for p, names in paths.items()} for k, paths in sorted(self.ran.items())}

    def ours(self, kernel: str) -> int:
        """Modules that ran distsft's path for `kernel` (Triton kernel, fused LoRA, our dequantization)."""
        paths = self.ran.get(kernel, {})
        return len(paths.get("fused" if kernel == "lora" else "triton", ()))

    def missing(self, report: PatchReport) -> dict[str, int]:
        """Patched kernels that ran our path on fewer modules than were patched: {kernel: shortfall}."""
        return {k: n - self.ours(k) for k, n in report.counts.items() if n and self.ours(k) < n}

    def as_dict(self, report: PatchReport | None = None) -> dict:
        out = {"ran": self.counts(), "fused_groups": dict(self.groups),
               "fallbacks": dict(sorted(self.fallbacks.items()))}
        if report is not None:
            out["patched"] = dict(report.counts)
            out["missing"] = self.missing(report)
        return out

    def summary(self, report: PatchReport) -> str:
        """One line: per patched kernel, how many modules ran our path out of those patched, and how."""
        parts = []
        for kernel, n in report.counts.items():
            if not n:
                continue
            paths = self.ran.get(kernel, {})
            how = ", ".join(f"{p} {len(v)}" for p, v in sorted(paths.items())) or "never called"
            parts.append(f"{kernel} {self.ours(kernel)}/{n} ({how})")
        for kernel in ("dequantize_4bit", "loss"):
            if kernel in self.ran:
                parts.append(f"{kernel}: " + ", ".join(f"{p} {len(v)}" for p, v in sorted(self.ran[kernel].items())))
        if self.groups:
            parts.append("fused groups: " + ", ".join(f"{g} x{n}" for g, n in sorted(self.groups.items())))
        return "; ".join(parts) or "no patched module ran"

    def fallback_warnings(self) -> list[str]:
        """One message per reason, naming every layer that fell back for it."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        for name, why in sorted(self.fallbacks.items()):
            by_reason[why].append(name)
        msgs = [f"kernels.lora: {len(names)} LoRA layer(s) ran peft's forward, not the fused projections, "
                f"because {why}: {', '.join(names)}" for why, names in by_reason.items()]
        if self.why_reference:
            ref = sorted(k for k, paths in self.ran.items() if "torch" in paths)
            if ref:
                msgs.append(f"kernels: {', '.join(ref)} ran the PyTorch reference, not Triton: {self.why_reference}")
        return msgs


_CENSUS: KernelCensus | None = None


@contextlib.contextmanager
def record_kernels():
    """Count what the patched forwards run inside the block (nested blocks share the outer census)."""
    global _CENSUS
    if _CENSUS is not None:
        yield _CENSUS
        return
    _CENSUS = KernelCensus()
    try:
        yield _CENSUS
    finally:
        census, _CENSUS = _CENSUS, None
        del census


def _note(kernel: str, path: str, name: str) -> None:
    if _CENSUS is not None:
        _CENSUS.note(kernel, path, name)


def _note_backend(kernel: str, spec: _Spec, triton: bool, t: torch.Tensor) -> None:
    if _CENSUS is not None:
        _CENSUS.note(kernel, "triton" if triton else "torch", spec.name)
        if not triton and _CENSUS.why_reference is None:
            _CENSUS.why_reference = (
                "kernels.backend=torch" if spec.backend == "torch" else "Triton is not installed"
                if not K.HAS_TRITON else f"the tensors are on {t.device}, and Triton runs on CUDA or, on the "
                "CPU, only when TRITON_INTERPRET=1 is set before distsft_kernels is imported")


# ----------------------------------------------------------------------------------------------------
# Backend choice, per call


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    ok = K.HAS_TRITON and K.triton_can_run(t)
    if backend == "triton" and not ok:
        why = "Triton is not installed" if not K.HAS_TRITON else (
            f"the tensors are on {t.device} and the kernels were loaded "
            + ("under TRITON_INTERPRET=1 (CPU only)" if K.INTERPRETED else "for the GPU (set TRITON_INTERPRET=1 "
               "before importing distsft_kernels to run them on CPU)"))
        raise RuntimeError(f"kernels.backend=triton but Triton cannot run here: {why}; use kernels.backend=auto")
    return ok


# ----------------------------------------------------------------------------------------------------
# The bound forwards (self is the HF module instance)


def _rms_norm_forward(self, hidden_states):
    spec = getattr(self, _TAG)
    eps = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    offset = 1.0 if spec.casting == "gemma" else 0.0
    triton = _use_triton(spec.backend, hidden_states)
    _note_backend("rms_norm", spec, triton, hidden_states)
    if triton:
        return K.rms_norm(hidden_states, self.weight, eps, offset=offset, casting=spec.casting,
                          spare_cols=spec.spare_cols)
    return rms_norm_ref(hidden_states, self.weight, eps, offset=offset, casting=spec.casting)


def _mlp_forward(self, x):
    spec = getattr(self, _TAG)
    gate, up = _projections(x, (self.gate_proj, self.up_proj))  # HF's order (matters for LoRA dropout's RNG)
    triton = _use_triton(spec.backend, gate)
    _note_backend("swiglu", spec, triton, gate)
    if triton:
        # gate and up are ours (fresh projection outputs, read by nothing else): their memory takes the grads
        h = K.gated_activation(gate, up, spec.activation, inplace_grads=True)
    else:
        h = self.act_fn(gate) * up
    if (spec.arch is not None and spec.arch.mlp_to_residual and recomputing()
            and _lora_unfused_reason(self.down_proj) is None):
        # A checkpointed layer's recompute: this output only feeds the residual sum leaving the layer,
        # whose value backward never reads; skip its GEMMs (distsft/offload.py).
        return _fused_lora(h, (self.down_proj,), values_unused=True)[0]
    return self.down_proj(h)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    """HF's Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma2 attention forward with the rotation swapped."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    spec = getattr(self, _TAG)
    arch = spec.arch
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = _projections(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    if arch.qk_norm:
        query_states = self.q_norm(q.view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(k.view(hidden_shape)).transpose(1, 2)
    else:
        query_states = q.view(hidden_shape).transpose(1, 2)  # (B, Hq, T, D)
        key_states = k.view(hidden_shape).transpose(1, 2)  # (B, Hk, T, D)
    value_states = v.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings  # (B|1, T, D) from the model's rotary embedding (any rope variant)
    triton = _use_triton(spec.backend, query_states)
    _note_backend("rope", spec, triton, query_states)
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
# Fused LoRA projections (distsft_kernels.lora_projections): bound to peft's LoRA Linear instances, and
# grouped over q/k/v and gate/up by the attention and MLP forwards above.


def _lora_static_reason(m) -> str | None:
    """Why this peft LoRA layer cannot take the fused path, judged at patch time (None: it can)."""
    keys = list(m.lora_A.keys())
    if len(keys) != 1:
        return f"{len(keys)} adapters"
    key = keys[0]
    if key in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(key, False):
        return "a LoRA variant (DoRA, ...)"
    if not isinstance(m.lora_dropout[key], torch.nn.Identity):
        return "lora.dropout > 0"
    if m.lora_A[key].bias is not None or m.lora_B[key].bias is not None:
        return "a LoRA bias"
    if getattr(m, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    base = m.get_base_layer()
    if base.bias is not None and base.bias.requires_grad:
        return "a trainable base bias"
    if type(base) is not torch.nn.Linear and not _is_4bit(base):
        return f"base layer {type(base).__name__}"
    return None


def _is_4bit(base) -> bool:
    return type(base).__name__ == "Linear4bit" and hasattr(base.weight, "quant_state")


def _lora_unfused_reason(m) -> str | None:
    """Per call: None when the fused path computes exactly what peft's forward would right now, else why
    not. Anything that hooks the module itself (DeepSpeed ZeRO-3's per-module gathering, accelerate's
    offload hooks) keeps peft's forward, as does a weight that is not whole here. Under ZeRO-3 the trainer
    gathers each decoder layer whole before its forward (distsft.distributed.gather_decoder_layers_whole),
    so the LoRA layers inside carry no hooks and every weight is whole when they run."""
    spec = m.__dict__.get(_TAG)
    if spec is None or spec.activation != "lora":
        return "not patched"
    if m.disable_adapters or m.merged:
        return "the adapter is disabled or merged"
    if m.active_adapters != list(m.lora_A.keys()):
        return "another adapter is active"
    base = m.get_base_layer()
    for mod in (m, base):
        if "_hf_hook" in mod.__dict__:
            return "accelerate hooks the module (device_map offload)"
        if mod._forward_hooks or mod._forward_pre_hooks:
            return ("hooks run on the module itself (DeepSpeed ZeRO-3 gathers it per module: "
                    "distributed.zero3_gather=layer gathers whole decoder layers)")
    key = m.active_adapters[0]
    for p in (base.weight, m.lora_A[key].weight, m.lora_B[key].weight):
        if getattr(p, "ds_status", None) is not None and p.ds_status.name != "AVAILABLE":
            return "a ZeRO-3 partitioned weight is not gathered when the projection runs"
    return None


def _dequantize_4bit(layer, spec: _Spec, out: torch.Tensor | None = None, tail: tuple | None = None
                     ) -> torch.Tensor:
    """A bitsandbytes Linear4bit weight as a (out, in) tensor in its compute dtype (written into `out`, a
    possibly row-strided (out, in) view, when given; with `tail = (b, col, width)` also the `width` columns
    after `out` in its rows: zeros but `b` from column `col`, as `K.Dequantizer` takes it)."""
    w = layer.weight
    state = w.quant_state
    dtype = layer.compute_dtype if layer.compute_dtype is not None else state.dtype
    plan = layer.__dict__.get("_distsft_dequantizer")  # (what it was built from, K.Dequantizer)
    if plan is not None and spec.dequantize_4bit and spec.backend != "torch" and plan[0] == _quant_sources(
            w, state, dtype):
        _note("dequantize_4bit", "triton", spec.name)
        # a ZeRO-3 parameter's bytes are in a new buffer after each gather: passed per call
        return plan[1](out, tail, data=w.data if _moves(w) else None)
    full = _dequantize_4bit_uncached(layer, spec, w, state, dtype, out)
    if tail is not None:  # (later calls write these in the dequantization's launch, where it is ours)
        b, col, width = tail
        cols = out.as_strided((out.shape[0], width), out.stride(), out.storage_offset() + out.shape[1])
        cols.zero_()
        cols[:, col:col + b.shape[1]].copy_(b)
    return full


def _dequantize_4bit_uncached(layer, spec: _Spec, w, state, dtype, out: torch.Tensor | None) -> torch.Tensor:
    data = w.data
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout (model.py)
        import bitsandbytes as bnb

        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        full = bnb.functional.dequantize_4bit(data, state)
    elif spec.dequantize_4bit and _use_triton(spec.backend, data):
        _note("dequantize_4bit", "triton", spec.name)
        if state.dtype == dtype:
            # checked once, then each call is little more than the launch (~640 per 8B step)
            moves = _moves(w)
            plan = (_quant_sources(w, state, dtype), K.Dequantizer.from_state(data, state, hold_data=not moves))
            layer.__dict__["_distsft_dequantizer"] = plan
            return plan[1](out, data=data if moves else None)
        full = K.dequantize_4bit_state(data, state)
    else:
        import bitsandbytes as bnb

        _note("dequantize_4bit", "bitsandbytes", spec.name)
        full = bnb.functional.dequantize_4bit(data, state)
    if out is not None:
        return out.copy_(full)
    return full if full.dtype == dtype else full.to(dtype)


def _moves(w) -> bool:
    """A ZeRO-3 parameter: its bytes are in a new buffer after every gather (and freed after its release)."""
    return hasattr(w, "ds_id")


def _quant_sources(w, state, dtype) -> tuple:
    """What a layer's cached Dequantizer was built from, compared by identity (and the packed storage's
    address, except for a ZeRO-3 parameter, whose bytes are passed per call): moving or replacing the
    weight or its quantization state (`.to(device)`, a reload) changes one of them, and the next call
    builds a new one."""
    s2 = state.state2 if state.nested else None
    return (0 if _moves(w) else w.data_ptr(), id(state), id(state.absmax), id(state.code), id(state.offset),
            id(s2.absmax) if s2 is not None else 0, id(s2.code) if s2 is not None else 0, dtype)


class _Dequantized4bit:
    """A 4-bit base weight as lora_projections takes a weight callable: `fn(out=None, tail=None)`."""

    writes_tail = True  # fills [W | B_pad]'s B columns itself (in the dequantization's launch)
    __slots__ = ("layer", "spec")

    def __init__(self, layer, spec: _Spec):
        self.layer, self.spec = layer, spec

    def __call__(self, out: torch.Tensor | None = None, tail: tuple | None = None) -> torch.Tensor:
        return _dequantize_4bit(self.layer, self.spec, out, tail)


KEEP_RECOMPUTED_DEQUANT = False
"""4-bit bases in a checkpointed layer's recompute: keep each dequantized weight for the backward that
follows instead of dequantizing it again (~0.3 GB more at the peak for an 8B layer; off by default)."""


def _fused_lora(x, modules, values_unused: bool = False):
    key = modules[0].active_adapters[0]
    if _CENSUS is not None:
        for m in modules:
            _CENSUS.note("lora", "fused", m.__dict__[_TAG].name)
        _CENSUS.groups["+".join(m.__dict__[_TAG].name.rpartition(".")[2] for m in modules)] += 1
    weights, biases, base_outs = [], [], []
    for m in modules:
        base = m.get_base_layer()
        if _is_4bit(base):
            # Dequantized on demand, in the forward and again in the backward (never kept): the same
            # fused GEMMs as a plain weight, no bitsandbytes autograd node and no separate dx sum.
            weights.append(_Dequantized4bit(base, m.__dict__[_TAG]))
            biases.append(base.bias)
            base_outs.append(None)
        else:
            weights.append(base.weight)
            biases.append(base.bias)
            base_outs.append(None)
    return K.lora_projections(
        x, [m.lora_A[key].weight for m in modules], [m.lora_B[key].weight for m in modules],
        [m.scaling[key] for m in modules], weights=weights, biases=biases, base_outs=base_outs,
        values_unused=values_unused, keep_dequantized=KEEP_RECOMPUTED_DEQUANT and recomputing())


def _peft_forward(m, x, why: str, *args, **kwargs):
    """peft's own forward for a bound LoRA layer that cannot be fused now (counted, with the reason)."""
    if _CENSUS is not None:
        name = m.__dict__[_TAG].name
        _CENSUS.note("lora", "peft", name)
        _CENSUS.fallbacks.setdefault(name, why)
        if _is_4bit(m.get_base_layer()):
            _CENSUS.note("dequantize_4bit", "bitsandbytes", name)
    return type(m).forward(m, x, *args, **kwargs)


def _lora_forward(self, x, *args, **kwargs):
    why = "peft's forward was called with extra arguments" if args or kwargs else _lora_unfused_reason(self)
    if why is not None:
        return _peft_forward(self, x, why, *args, **kwargs)
    return _fused_lora(x, (self,))[0]


def _projections(x, modules) -> tuple:
    """modules(x) for projections that read the same x: one fused node when all of them are fused LoRA
    layers with the same adapter, else each module called as HF calls it."""
    bound = all(_TAG in m.__dict__ and m.__dict__[_TAG].activation == "lora" for m in modules)
    if (bound and all(_lora_unfused_reason(m) is None for m in modules)
            and len({m.active_adapters[0] for m in modules}) == 1):
        return _fused_lora(x, modules)
    return tuple(m(x) for m in modules)


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
    if hasattr(module, _TAG):
        raise ValueError(f"{type(module).__name__} is already patched: revert_kernels first")
    # accelerate's hooks (device_map) wrap `forward` and call `_old_forward`: replace the inner one.
    attr = "_old_forward" if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__ else "forward"
    undo.append((module, attr, module.__dict__.get(attr, _MISSING)))
    setattr(module, _TAG, spec)
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
                _bind(m, _lora_forward, _Spec(cfg.backend, activation="lora", dequantize_4bit=cfg.dequantize_4bit,
                                              name=name), undo)
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
    kernels/lora.py), where the attention (rope) or MLP (swiglu) forward is ours and calls the group as
    one. 0 where no such group follows (the columns would go unused; nothing else)."""
    prefix, _, leaf = norm_name.rpartition(".")
    if leaf not in _NORM_FEEDS:
        return 0
    parent, projs = _NORM_FEEDS[leaf]
    if not (cfg.rope if parent == "self_attn" else cfg.swiglu):
        return 0
    group = [lora_layers.get(f"{prefix}.{parent}.{p}") for p in projs]
    if any(g is None or g[1] is not None or not _is_4bit(g[0].get_base_layer()) for g in group):
        return 0
    key = group[0][0].active_adapters[0]
    return sum(m.lora_A[key].weight.shape[0] for m, _ in group)


def _lora_layers(hf) -> dict[str, tuple]:
    """{logical name: (peft LoRA Linear layer, reason it cannot be fused or None)}."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, m in hf.named_modules():
        if isinstance(m, LoraLayer) and type(m).__name__ in ("Linear", "Linear4bit") and hasattr(m, "lora_A"):
            found[_logical_name(name)] = (m, _lora_static_reason(m))
    return found


def _undo(undo: list) -> None:
    for module, attr, previous in reversed(undo):
        if previous is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, previous)
        module.__dict__.pop(_TAG, None)
    undo.clear()


def revert_kernels(model, report: PatchReport) -> None:
    """Restore the forwards `apply_kernels` replaced on this model (the classes' own, or what was bound)."""
    hf = _hf_model(model)
    if report._model is not None and report._model() is not hf:
        raise ValueError("revert_kernels: this report belongs to another model instance")
    _undo(report._undo)
    report.counts = {k: 0 for k in report.counts}


# ----------------------------------------------------------------------------------------------------
# The loss


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def select_loss_fn(cfg: KernelsConfig) -> LossFn:
    """The LM-head + loss function for `cfg`:

        loss_fn(hidden (N, d), weight (V, d), targets (N,), *, bias=None, softcap=None,
                ignore_index=-100, label_smoothing=0.0) -> (loss_sum fp32, n_valid int64)

    targets are already shifted. Fused linear CE when `cfg.fused_linear_cross_entropy`, else logits +
    our CE kernel when `cfg.cross_entropy`, else the reference; Triton or reference per call (backend).
    """
    kind = "fused_linear_ce" if cfg.fused_linear_cross_entropy else "ce" if cfg.cross_entropy else "reference"
    backend = cfg.backend

    def loss_fn(hidden, weight, targets, *, bias=None, softcap=None, ignore_index=IGNORE_INDEX,
                label_smoothing=0.0):
        kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap)
        triton = kind != "reference" and _use_triton(backend, hidden)
        _note("loss", f"{kind} (triton)" if triton else "reference (torch)", "lm_head")
        if triton:
            if kind == "fused_linear_ce":
                return K.fused_linear_cross_entropy(hidden, weight, targets, bias=bias, **kw)
            logits = F.linear(hidden, weight, bias)  # (N, V) in the input dtype; ours, so CE may overwrite it
            return K.cross_entropy(logits, targets, inplace=True, **kw)
        return fused_linear_cross_entropy_ref(hidden, weight, targets, bias=bias, **kw)

    loss_fn.__name__ = loss_fn.__qualname__ = f"loss_fn[{kind}, backend={backend}]"
    return loss_fn
