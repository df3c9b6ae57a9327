"""Recomputation chosen by a memory budget: checkpoint as few decoder layers as fit (`gradient_checkpointing: auto`).

    plan = plan_recomputation(model, batch_size=2, seq_len=2048)        # budget: 90% of the GPU's memory
    apply_recomputation(model, plan)                                     # per-layer, non-reentrant
    logger.info("%s", plan)

Checkpointing a decoder layer trades its saved activations for one more forward of that layer in the
backward pass (~1/3 of its cost). `auto` pays that only for the layers the budget requires.

The memory model (bytes; L decoder layers, k of them checkpointed):

    A      = activations one decoder layer saves for backward, *measured*: one layer forward on a dummy
             micro-batch of the real shape under `saved_tensors_hooks`, counting each distinct storage once
             and excluding parameters and the tensors shared by all layers (RoPE cos/sin, the mask)
    c      = what a checkpointed layer keeps instead: its input hidden states, (B, T, d)
    fixed  = parameters and buffers allocated now (+ everything else allocated, on a GPU)
             + AdamW state 2 x fp32 + gradients, per trainable parameter
             (+ under ZeRO-3, where only partitions are allocated now, two decoder layers gathered whole)
    shared = the per-layer kwargs (cos/sin, mask) + the final norm's input and output (2c)
    head   = the LM head / loss working set (estimate): the kept rows and their gradient (2 N d) + the
             logits, all of them (N V, + fp32 copies) or one fused-CE chunk (<= 512 MiB); N = B T
    bwd    = one layer's backward working set (estimate): incoming and outgoing hidden grads (2c) + the
             largest single saved storage (the gradient of the largest intermediate)

    peak(k) = fixed + shared + max((L - k) A + k c + max(head, bwd),     end of forward / head backward
                                   (k - 1) c + A + bwd  if k > 0)         recomputing layer k-1

The checkpointed layers are the *first* k: backward reaches them last, when the activations of the
uncheckpointed layers are already freed, so a recomputed layer never coexists with them (the second
term); checkpointing the last k instead would recompute on top of all of them. Every layer costs the same
to recompute, so which k layers changes only that peak. peak(k) does not increase with k (c <= A), so the
plan is the smallest k with peak(k) <= budget; when even k = L does not fit, it warns and checkpoints all.
Layer 0 is measured as every other layer (input requiring grad); its real input, the embedding output,
needs no gradient, so uncheckpointed it keeps about c less: the layer terms are exact for k >= 1 and high
by about c for k = 0 (tests/unit/test_recompute.py checks both against the memory the graph retains).

Mechanism: transformers' own per-layer switch. Every decoder layer of the supported architectures is a
`GradientCheckpointingLayer` (transformers >= 4.52 incl. 5.17 and 5.23), which checkpoints its forward
through `self._gradient_checkpointing_func` when `self.gradient_checkpointing and self.training`; we set
both attributes per instance, nothing else (no class or module-tree changes, state dicts unchanged).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_BUDGET_FRACTION = 0.9
"""Without `model.memory_budget_gib`: this share of the GPU's total memory (the rest covers the CUDA
context, allocator fragmentation and what the estimates miss)."""
_FUSED_CE_CHUNK_BYTES = 1 << 29  # the fused linear CE's logits chunk (distsft_kernels/fused_linear_cross_entropy.py)


@dataclass(frozen=True)
class RecomputePlan:
    """Which decoder layers to checkpoint, and the estimate behind it (bytes)."""

    num_layers: int
    checkpointed: tuple[int, ...]
    budget_bytes: int | None
    """None: no budget (CPU without `model.memory_budget_gib`): nothing is checkpointed."""
    layer_activation_bytes: int
    """A: saved for backward by one uncheckpointed layer (measured)."""
    checkpointed_layer_bytes: int
    """c: kept by one checkpointed layer (its input hidden states)."""
    fixed_bytes: int
    shared_bytes: int
    head_bytes: int
    backward_bytes: int
    batch_shape: tuple[int, int]

    def estimated_peak(self, k: int | None = None) -> int:
        """peak(k) of the module docstring; k defaults to this plan's."""
        k = len(self.checkpointed) if k is None else k
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"k must be in [0, {self.num_layers}], got {k}")
        a, c, n = self.layer_activation_bytes, self.checkpointed_layer_bytes, self.num_layers
        end_of_forward = (n - k) * a + k * c + max(self.head_bytes, self.backward_bytes)
        recompute = (k - 1) * c + a + self.backward_bytes if k > 0 else 0
        return self.fixed_bytes + self.shared_bytes + max(end_of_forward, recompute)

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.estimated_peak() <= self.budget_bytes

    def as_dict(self) -> dict:
        """For trackers: plain numbers (GiB) and the layer list."""
        d = asdict(self)
        out = {"checkpointed_layers": len(self.checkpointed), "num_layers": self.num_layers,
               "estimated_peak_gib": self.estimated_peak() / GIB,
               "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB}
        out.update({k.replace("_bytes", "_gib"): v / GIB for k, v in d.items()
                    if k.endswith("_bytes") and k != "budget_bytes"})
        return out

    def __str__(self) -> str:
        k = len(self.checkpointed)
        which = "none" if k == 0 else f"layers {self.checkpointed[0]}-{self.checkpointed[-1]}"
        budget = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / GIB:.2f} GiB"
        return (f"checkpoint {k}/{self.num_layers} decoder layers ({which}) for micro-batch "
                f"{self.batch_shape[0]}x{self.batch_shape[1]}: estimated peak {self.estimated_peak() / GIB:.2f} GiB, "
                f"{budget}{'' if self.fits else ' (does NOT fit)'}; per layer "
                f"{self.layer_activation_bytes / GIB:.3f} GiB saved, {self.checkpointed_layer_bytes / GIB:.3f} GiB "
                f"checkpointed; fixed {self.fixed_bytes / GIB:.2f}, head {self.head_bytes / GIB:.2f} GiB")


# ----------------------------------------------------------------------------------------------------
# Finding the pieces


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside `CausalLMWithLoss`, a peft model or itself."""
    if hasattr(model, "causal_lm"):
        return model.causal_lm
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks (`get_decoder().layers`), each a transformers GradientCheckpointingLayer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = _causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(lm).__name__}: no decoder layers found (`get_decoder().layers`); "
                         "model.gradient_checkpointing=auto cannot plan for it: use true or false")
    bad = [type(m).__name__ for m in layers if not isinstance(m, GradientCheckpointingLayer)]
    if bad:
        raise ValueError(f"{bad[0]} is not a transformers GradientCheckpointingLayer: per-layer checkpointing "
                         "(model.gradient_checkpointing=auto) needs one; use true or false")
    return layers


def _storage_key(t: torch.Tensor) -> tuple | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return None
    if s.nbytes() == 0:
        return None
    return (t.device, s.data_ptr())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _distinct_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------
# Measuring one layer


def measure_layer_activations(model: nn.Module, batch_size: int, seq_len: int,
                              decoder_kwargs: dict | None = None) -> dict[str, int]:
    """Bytes one decoder layer saves for backward on a (batch_size, seq_len) micro-batch.

    Runs layer 0 forward (train mode, grad on, its own checkpointing off) on the hidden states the
    decoder really feeds it, with `requires_grad` as for every layer after the first, under
    `saved_tensors_hooks` that count distinct storages, excluding parameters and the storages of the
    layer's other inputs (cos/sin, mask: shared by all layers, counted once in `shared`).
    Returns {"layer": A, "input": c, "shared_inputs", "largest": the biggest single saved storage,
    "element_size": of the hidden states}.
    """
    layers = decoder_layers(model)
    lm = _causal_lm(model)
    device = next(lm.parameters()).device
    layer = layers[0]
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    position_ids = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    captured = {}

    def grab(module, args, kwargs):
        if "args" not in captured:
            captured["args"], captured["kwargs"] = args, dict(kwargs)

    was_training = lm.training
    saved_flags = [m.gradient_checkpointing for m in layers]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        lm.train()
        for m in layers:
            m.gradient_checkpointing = False
        with torch.no_grad():
            lm.get_decoder()(**{"input_ids": input_ids, "position_ids": position_ids, "use_cache": False,
                                **(decoder_kwargs or {})})
        handle.remove()
        args, kwargs = captured["args"], captured["kwargs"]
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        hidden = hidden.detach().clone().requires_grad_(True)  # (B, T, d)
        shared = {k for t in _tensors((rest, kwargs)) if (k := _storage_key(t)) is not None}
        saved: dict[tuple, int] = {}

        def pack(t: torch.Tensor):
            key = _storage_key(t)
            if key is not None and key not in shared:
                params = {_storage_key(p) for p in layer.parameters()}  # per call: ZeRO-3 gathers lazily
                if key not in params:
                    saved[key] = t.untyped_storage().nbytes()
            # Keep the storage alive until the graph goes (a freed address could be reused and a second
            # storage counted as the first), but not `t` itself: a saved output would then hold its own
            # grad_fn, a reference cycle through C++ that keeps the whole graph alive after we drop it.
            return t.detach()

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # never unpacked
            out = layer(hidden, *rest, **kwargs)
        del out  # frees the graph and what it saved
    finally:
        handle.remove()
        for m, flag in zip(layers, saved_flags, strict=True):
            m.gradient_checkpointing = flag
        lm.train(was_training)
    return {"layer": sum(saved.values()), "input": hidden.numel() * hidden.element_size(),
            "shared_inputs": _distinct_bytes(_tensors((rest, kwargs))), "largest": max(saved.values(), default=0),
            "element_size": hidden.element_size()}


# ----------------------------------------------------------------------------------------------------
# Planning and applying


def default_budget_bytes(device: torch.device) -> int | None:
    """90% of the GPU's total memory; None on CPU (no budget: `auto` checkpoints nothing there)."""
    if device.type == "cuda":
        return int(DEFAULT_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    return None


ZERO3_LIVE_LAYERS = 2
"""Decoder layers whose ZeRO-3-partitioned parameters are gathered at once: the one computing and the next,
prefetched (distsft.distributed.prepare_zero3 sizes DeepSpeed's prefetch bucket to one layer)."""


def _fixed_bytes(lm: nn.Module, device: torch.device, layers: nn.ModuleList | None = None) -> int:
    """Allocated now (parameters, buffers, on a GPU everything else too) + AdamW state + gradients, and
    under ZeRO-3 the gathered copies of ZERO3_LIVE_LAYERS decoder layers (only partitions are allocated now)."""
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
    else:
        resident = _distinct_bytes(list(lm.parameters()) + list(lm.buffers()))
    trainable = [p for p in lm.parameters() if p.requires_grad]
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)  # ZeRO-3: the whole parameter
    grads = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in trainable)
    gathered = 0
    if layers is not None and any(hasattr(p, "ds_id") for p in layers[0].parameters()):
        per_layer = max(sum(p.ds_numel * p.element_size() for p in layer.parameters()) for layer in layers)
        gathered = min(ZERO3_LIVE_LAYERS, len(layers)) * per_layer
    return resident + 2 * 4 * numel + grads + gathered


def plan_recomputation(model: nn.Module, *, batch_size: int, seq_len: int, budget_bytes: int | None = None,
                       fused_loss: bool = True, decoder_kwargs: dict | None = None,
                       offload: bool = False) -> RecomputePlan:
    """The smallest number of leading decoder layers to checkpoint so that the estimated peak fits.

    `model`: the trained module (`CausalLMWithLoss`, a peft model or an HF causal LM) with LoRA applied,
    on its training device. `batch_size` x `seq_len`: the micro-batch (per_device_train_batch_size x
    data.max_seq_len). `budget_bytes`: default `default_budget_bytes(device)`. `fused_loss`: whether the
    loss runs the chunked fused linear cross-entropy (else the full logits are counted). `decoder_kwargs`:
    extra decoder inputs of the real batches, e.g. the packed 4-D attention mask. `offload`: checkpointed
    layers keep their inputs in host memory (distsft/offload.py), so c = 0 on the device.
    """
    lm = _causal_lm(model)
    layers = decoder_layers(model)
    n = len(layers)
    device = next(lm.parameters()).device
    if budget_bytes is None:
        budget_bytes = default_budget_bytes(device)
    fixed = _fixed_bytes(lm, device, layers)
    m = measure_layer_activations(model, batch_size, seq_len, decoder_kwargs)
    h = m["input"]  # one (B, T, d) hidden-states tensor
    c = 0 if offload else h
    tokens = batch_size * seq_len
    vocab, elem = lm.config.get_text_config().vocab_size, m["element_size"]  # (ZeRO-3 partitions the head)
    logits = min(tokens * vocab * elem, _FUSED_CE_CHUNK_BYTES) if fused_loss else tokens * vocab * (elem + 8)
    plan = RecomputePlan(
        num_layers=n, checkpointed=(), budget_bytes=budget_bytes, layer_activation_bytes=m["layer"],
        checkpointed_layer_bytes=c, fixed_bytes=fixed, shared_bytes=m["shared_inputs"] + 2 * h,
        head_bytes=2 * h + logits, backward_bytes=2 * h + m["largest"],
        batch_shape=(batch_size, seq_len),
    )
    if budget_bytes is None:
        return plan
    k = next((k for k in range(n + 1) if plan.estimated_peak(k) <= budget_bytes), None)
    if k is None:
        k = n
        logger.warning("recomputation: even with all %d decoder layers checkpointed the estimated peak %.2f GiB "
                       "exceeds the budget of %.2f GiB; checkpointing all and trying anyway (lower "
                       "per_device_train_batch_size or data.max_seq_len if it runs out of memory)",
                       n, plan.estimated_peak(n) / GIB, budget_bytes / GIB)
    return _with_k(plan, k)


def _with_k(plan: RecomputePlan, k: int) -> RecomputePlan:
    return RecomputePlan(**{**plan.__dict__, "checkpointed": tuple(range(k))})


def apply_recomputation(model: nn.Module, plan: RecomputePlan, fn=None) -> int:
    """Checkpoint exactly the plan's layers and no others; returns how many. `fn`: the checkpoint function
    (transformers' `_gradient_checkpointing_func` signature); default torch's non-reentrant checkpoint."""
    layers = decoder_layers(model)
    if len(layers) != plan.num_layers:
        raise ValueError(f"the plan is for {plan.num_layers} decoder layers, the model has {len(layers)}")
    fn = fn or functools.partial(checkpoint, use_reentrant=False)
    chosen = set(plan.checkpointed)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
        layer._gradient_checkpointing_func = fn
    return len(chosen)
