"""The fused LoRA projections (distsft_kernels.lora_projections), bound to peft's LoRA Linear instances
by distsft/patching.py and grouped over q/k/v and gate/up by its attention and MLP forwards.

    why = static_reason(layer)          # at patch time: None, or why this layer keeps peft's forward
    y = lora_forward(layer, x)          # the forward bound to one LoRA layer
    q, k, v = projections(x, (q_proj, k_proj, v_proj))  # one autograd node for the group

A layer whose computation the fused path does not reproduce (a variant, dropout, several adapters) keeps
peft's forward from the start; one whose weights are not whole in this process right now (DeepSpeed
ZeRO-3 with per-module gathering, accelerate's offload hooks) keeps it for that call (`unfused_reason`).
Both are counted in the kernel census with their reason (distsft/census.py). A 4-bit base weight is
dequantized on demand inside the node (distsft/qlora.py).
"""

from __future__ import annotations

import distsft_kernels as K
import torch

from distsft import census, qlora
from distsft.census import TAG
from distsft.recompute import recomputing


def static_reason(m) -> str | None:
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
    if type(base) is not torch.nn.Linear and not qlora.is_4bit(base):
        return f"base layer {type(base).__name__}"
    return None


_PARTS = "_distsft_lora_parts"


def _parts(m) -> tuple | None:
    """(adapter key, base layer, lora_A, lora_B) of a bound LoRA layer whose one adapter is the active one,
    else None. Looked up through peft once per adapter (the layer's attribute cache is checked against its
    adapter modules on every call): this runs for every projection in every forward and recompute, and
    peft's properties and `get_base_layer` cost a host-bound ZeRO-3 step ~10 us per call."""
    active = m.active_adapters
    modules = m._modules
    lora_a, lora_b = modules["lora_A"]._modules, modules["lora_B"]._modules
    if len(active) != 1 or list(lora_a) != active:
        return None
    key = active[0]
    cached = m.__dict__.get(_PARTS)
    if cached is None or cached[0] != key or cached[2] is not lora_a[key] or cached[3] is not lora_b.get(key):
        cached = m.__dict__[_PARTS] = (key, m.get_base_layer(), lora_a[key], lora_b[key])
    return cached


def _param(module, name: str):
    """`module.<name>` for a registered parameter, read from its dict without module attribute lookup or
    DeepSpeed's gathering getter (`unfused_reason` has checked the weights are whole)."""
    return dict.__getitem__(module._parameters, name)


def unfused_reason(m) -> str | None:
    """Per call: None when the fused path computes exactly what peft's forward would right now, else why
    not. Anything that hooks the module itself (DeepSpeed ZeRO-3's per-module gathering, accelerate's
    offload hooks) keeps peft's forward, as does a weight that is not whole here. Under ZeRO-3 the trainer
    gathers each decoder layer whole before its forward (distsft.distributed.prepare_zero3),
    so the LoRA layers inside carry no hooks and every weight is whole when they run."""
    spec = m.__dict__.get(TAG)
    if spec is None or spec.activation != "lora":
        return "not patched"
    if m.disable_adapters or m.merged:
        return "the adapter is disabled or merged"
    parts = _parts(m)
    if parts is None:
        return "another adapter is active"
    _, base, lora_a, lora_b = parts
    for mod in (m, base):
        if "_hf_hook" in mod.__dict__:
            return "accelerate hooks the module (device_map offload)"
        if mod._forward_hooks or mod._forward_pre_hooks:
            return ("hooks run on the module itself (DeepSpeed ZeRO-3 gathers it per module: "
                    "distributed.zero3_gather=layer gathers whole decoder layers)")
    for p in (_param(base, "weight"), _param(lora_a, "weight"), _param(lora_b, "weight")):
        if getattr(p, "ds_status", None) is not None and p.ds_status.name != "AVAILABLE":
            return "a ZeRO-3 partitioned weight is not gathered when the projection runs"
    return None


def fused(x, modules, values_unused: bool = False, parts=None):
    """The LoRA layers `modules` (fused, one adapter, `unfused_reason` None for each) applied to their
    common input x, as one node. `parts`: their `_parts`, when the caller has them."""
    parts = parts or [_parts(m) for m in modules]
    key = parts[0][0]
    if census.ACTIVE is not None:
        for m in modules:
            census.ACTIVE.note("lora", "fused", m.__dict__[TAG].name)
        census.ACTIVE.groups["+".join(m.__dict__[TAG].name.rpartition(".")[2] for m in modules)] += 1
    weights, biases = [], []
    for m, (_, base, _, _) in zip(modules, parts, strict=True):
        # A 4-bit weight is dequantized on demand, in the forward and again in the backward (never kept): the
        # same fused GEMMs as a plain weight, no bitsandbytes autograd node and no separate dx sum.
        weights.append(qlora.Dequantized4bit(base, m.__dict__[TAG]) if qlora.is_4bit(base) else _param(base, "weight"))
        biases.append(base._parameters.get("bias"))
    return K.lora_projections(
        x, [_param(a, "weight") for _, _, a, _ in parts], [_param(b, "weight") for _, _, _, b in parts],
        [m.scaling[key] for m in modules], weights=weights, biases=biases,
        values_unused=values_unused, keep_dequantized=qlora.KEEP_RECOMPUTED_DEQUANT and recomputing())


def _peft_forward(m, x, why: str, *args, **kwargs):
    """peft's own forward for a bound LoRA layer that cannot be fused now (counted, with the reason)."""
    if census.ACTIVE is not None:
        name = m.__dict__[TAG].name
        census.ACTIVE.note("lora", "peft", name)
        census.ACTIVE.fallbacks.setdefault(name, why)
        if qlora.is_4bit(m.get_base_layer()):
            census.ACTIVE.note("dequantize_4bit", "bitsandbytes", name)
    return type(m).forward(m, x, *args, **kwargs)


def lora_forward(self, x, *args, **kwargs):
    """The forward bound to a peft LoRA Linear instance (self)."""
    why = "peft's forward was called with extra arguments" if args or kwargs else unfused_reason(self)
    if why is not None:
        return _peft_forward(self, x, why, *args, **kwargs)
    return fused(x, (self,))[0]


def projections(x, modules) -> tuple:
    """modules(x) for projections that read the same x: one fused node when all of them are fused LoRA
    layers with the same adapter, else each module called as HF calls it."""
    bound = all(TAG in m.__dict__ and m.__dict__[TAG].activation == "lora" for m in modules)
    if bound and all(unfused_reason(m) is None for m in modules):
        parts = [_parts(m) for m in modules]
        if len({key for key, *_ in parts}) == 1:
            return fused(x, modules, parts=parts)
    return tuple(m(x) for m in modules)
