"""Recomputation (`model.gradient_checkpointing`): which decoder layers, chosen by a memory budget for `auto`
(as few as fit), and distsft's checkpoint that recomputes them, inputs optionally in host memory.

    plan = setup_recomputation(model, cfg.model, micro_batch=2, seq_len=2048, packing=True, fused_loss=True)
    plan = plan_recomputation(model, batch_size=2, seq_len=2048)        # budget: 90% of the GPU's memory
    apply_recomputation(model, plan, fn=device_checkpoint)               # per layer

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

Mechanism: each chosen decoder layer's `forward` is checkpointed, per instance (`checkpoint_layer`): the
layer is still called as a module, so module hooks (ZeRO-3's gather and release, DDP's and DeepSpeed's
gradient hooks) run around the checkpoint once, and only the layer's own computation is recomputed.
transformers' per-layer switch (`GradientCheckpointingLayer.gradient_checkpointing`) is kept off: up to
5.17 it checkpoints `__call__`, hooks included, so under ZeRO-3 every recomputed layer was gathered and
released a second time inside the backward (32 more fetches per 8B step, each ~0.5 ms of DeepSpeed's host
work); 5.25 checkpoints `forward`, as we do in every version. No class or module-tree changes, state dicts unchanged.
`setup_recomputation` is the one place a run sets it up: the plan (`true`: every layer; `auto`: as above),
and distsft's own checkpoint for the chosen layers (below), which `recomputing()` tells the patched
forwards about.

The checkpoint (`device_checkpoint`, `offloaded_checkpoint`). A checkpointed layer keeps only its input
hidden states (B, T, d) for the backward pass, which recomputes the layer from them. At long context these
inputs are what is left: Llama-3.1-8B at 131,072 tokens keeps 32 x 1 GiB. Offloading
(`model.offload_checkpoints`) moves each input to pinned CPU memory during the forward and brings it back
just before its layer's backward:

    forward, layer i:   out = layer(x_i) without saving anything;  x_i -> host (copy stream, async)
    backward, layer i:  wait for x_i on the GPU (prefetched while layer i+1 ran its backward);
                        start bringing x_{i-1} back;  recompute out = layer(x_i) with grad;  backprop

Both copies run on a side stream, ordered against the compute stream with stream waits (and
`record_stream` for the forward's copy, so the caching allocator never hands out x_i's memory while it is
still being read; the backward's buffers are the compute stream's own, freed with no deferral), so
they overlap the layers' compute instead of stalling it; one layer's input is on the GPU ahead of use
(double buffering). The recompute restores the CPU and CUDA RNG states of the forward, so dropout draws
the same masks. On CPU tensors the "offload" is a copy, so the mechanism is testable there.

The recompute skips work whose result backward never reads: `recomputing()` is true while a layer is
recomputed, and the patched MLP (distsft/patching.py) then skips the down projection's GEMMs, whose
output only feeds the residual sum leaving the layer (backward needs the projection's input, not its
output): ~1/7 of a Llama layer's forward FLOPs, on every recompute.

It is a reentrant checkpoint: the layer's recompute and backward run inside this node's backward, where
DDP's and DeepSpeed's gradient hooks fire as in any backward; ZeRO-3's pre-backward hook on the layer has
gathered its weights just before (tests/integration checks the losses of every mode against one process,
tests/unit/test_recompute.py that a checkpointed layer's module hooks run once per forward).
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from distsft.attention import packed_attention_kwargs
from distsft.config import ModelConfig

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

    def event_fields(self) -> dict:
        """The `recomputation` event's fields: the estimate when planned from a budget, else the counts."""
        if self.budget_bytes is not None:
            return self.as_dict()
        return {"checkpointed_layers": len(self.checkpointed), "num_layers": self.num_layers}

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
    saved_flags = [(m.gradient_checkpointing, m.__dict__.get("_distsft_checkpoint")) for m in layers]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        lm.train()
        for m in layers:
            m.gradient_checkpointing = False
            if "_distsft_checkpoint" in m.__dict__:
                m._distsft_checkpoint = None
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
        for m, (flag, fn) in zip(layers, saved_flags, strict=True):
            m.gradient_checkpointing = flag
            if "_distsft_checkpoint" in m.__dict__:
                m._distsft_checkpoint = fn
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
    layers keep their inputs in host memory (`offloaded_checkpoint`), so c = 0 on the device.
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


# ----------------------------------------------------------------------------------------------------
# The checkpoint: a layer's input kept on the device or in pinned host memory

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}
_last_forward = None  # weakref to the ctx of the most recent forward: the next one's predecessor
_recompute_depth = 0
_GRAD_ANCHOR = torch.zeros((), requires_grad=True)
"""An input that requires grad, so the node is recorded even when the hidden states do not (layer 0's
input is the frozen embedding's output); the layer's LoRA gradients are produced inside its backward."""


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed for its backward (read by the patched MLP and
    the fused LoRA projections: what the recompute may skip or keep)."""
    return _recompute_depth > 0


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offload, anchor, hidden, *others):
        global _last_forward
        ctx.run, ctx.others, ctx.device = run, others, hidden.device
        ctx.rng = _rng_state(hidden.device)
        with torch.no_grad():
            out = run(hidden, *others)
        if not offload:
            host = hidden.detach()  # kept on the device: the plain checkpoint
        elif hidden.is_cuda:
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            stream = _copy_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))  # x_i is written
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
            hidden.record_stream(stream)  # not reused before the copy has read it
        else:
            host = hidden.detach().clone()
        ctx.host, ctx.on_device = host, None
        ctx.prev = _last_forward  # the layer before this one (its input is needed right after ours)
        _last_forward = weakref.ref(ctx)
        return out

    @staticmethod
    def _fetch(ctx) -> None:
        """Start bringing this layer's input back to the GPU (idempotent)."""
        if ctx.on_device is not None:
            return
        if ctx.device.type != "cuda" or ctx.host.device == ctx.device:
            ctx.on_device, ctx.ready = ctx.host, None
            return
        # The buffer belongs to the compute stream, which reads and frees it: its memory is reusable as soon
        # as the layer's backward is enqueued. (Allocated on the copy stream and record_stream'ed here, each
        # buffer stayed reserved in the copy stream's pool until the GPU had finished with it, and the host
        # runs layers ahead of the GPU in the backward: up to 8 x 32 MiB held at the 8B QLoRA step's peak.)
        # The copy waits for the compute stream's work so far, which may still read what the block held.
        compute = torch.cuda.current_stream(ctx.device)
        x = torch.empty(ctx.host.shape, dtype=ctx.host.dtype, device=ctx.device)
        stream = _copy_stream(ctx.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            x.copy_(ctx.host, non_blocking=True)
        ctx.on_device, ctx.ready = x, stream.record_event()

    @staticmethod
    def backward(ctx, grad_out):
        global _recompute_depth
        _LayerCheckpoint._fetch(ctx)
        prev = ctx.prev() if ctx.prev is not None else None
        if prev is not None and getattr(prev, "host", None) is not None:
            _LayerCheckpoint._fetch(prev)  # overlaps with this layer's recompute and backward
        if ctx.ready is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.ready)
        x = ctx.on_device.detach().requires_grad_(True)
        ctx.host = ctx.on_device = None
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        _recompute_depth += 1
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
                out = ctx.run(x, *ctx.others)
        finally:
            _recompute_depth -= 1
        torch.autograd.backward(out, grad_out)
        return (None, None, None, x.grad, *([None] * len(ctx.others)))


def offloaded_checkpoint(function, hidden_states, *args, **kwargs):
    """transformers' `_gradient_checkpointing_func` signature: `function(hidden_states, *args, **kwargs)`
    run as one node whose saved input is in host memory. Only `hidden_states` may require grad."""
    return _checkpoint(True, function, hidden_states, *args, **kwargs)


def device_checkpoint(function, hidden_states, *args, **kwargs):
    """The same with the saved input kept on the device (no copies; the recompute savings still apply)."""
    return _checkpoint(False, function, hidden_states, *args, **kwargs)


def _checkpoint(offload: bool, function, hidden_states, *args, **kwargs):
    if kwargs:
        def run(h, *a):
            return function(h, *a, **kwargs)
    else:
        run = function
    for a in args:
        if torch.is_tensor(a) and a.requires_grad:
            raise ValueError("offloaded_checkpoint: only the hidden states may require grad")
    return _LayerCheckpoint.apply(run, offload, _GRAD_ANCHOR, hidden_states, *args)


# ----------------------------------------------------------------------------------------------------
# Setting it up


_CACHE_KWARGS = ("past_key_values", "layer_past", "cache")


def _checkpointed_forward(layer: nn.Module, plain):
    """`layer.forward` while it is checkpointed: `plain` (the forward it had) through the layer's checkpoint
    function when training with grad enabled, as is otherwise. The hidden states are the first positional
    argument (or `hidden_states=`); a cache is dropped, as transformers does: the recompute would update it
    a second time."""

    def forward(*args, **kwargs):
        fn = layer.__dict__.get("_distsft_checkpoint")
        if fn is None or not (layer.training and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        if not args:
            args = (kwargs.pop("hidden_states"),)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        for key in _CACHE_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
        return fn(functools.partial(plain, **kwargs), *args)

    return forward


def checkpoint_layer(layer: nn.Module, fn) -> None:
    """Recompute this decoder layer's forward in its backward through `fn` (transformers'
    `_gradient_checkpointing_func` signature: `fn(function, hidden_states, *args)`), or stop (`fn=None`).
    The layer's module hooks stay outside the checkpoint (module docstring). Per instance: the first call
    gives the layer a `forward` attribute that wraps the one it had; later calls only change `fn`."""
    layer.gradient_checkpointing = False  # transformers' own switch: off (it would checkpoint the hooks too)
    if "_distsft_checkpoint" not in layer.__dict__:
        layer.forward = _checkpointed_forward(layer, layer.forward)
    layer._distsft_checkpoint = fn


def is_checkpointed(layer: nn.Module) -> bool:
    """Whether the layer's forward is recomputed in its backward (by `checkpoint_layer`)."""
    return layer.__dict__.get("_distsft_checkpoint") is not None


def apply_recomputation(model: nn.Module, plan: RecomputePlan, fn=None) -> int:
    """Checkpoint exactly the plan's layers and no others; returns how many. `fn`: the checkpoint function
    (transformers' `_gradient_checkpointing_func` signature); default torch's non-reentrant checkpoint."""
    layers = decoder_layers(model)
    if len(layers) != plan.num_layers:
        raise ValueError(f"the plan is for {plan.num_layers} decoder layers, the model has {len(layers)}")
    fn = fn or functools.partial(checkpoint, use_reentrant=False)
    chosen = set(plan.checkpointed)
    for i, layer in enumerate(layers):
        checkpoint_layer(layer, fn if i in chosen else None)
    return len(chosen)


def setup_recomputation(model: nn.Module, cfg: ModelConfig, *, micro_batch: int, seq_len: int, packing: bool,
                        fused_loss: bool) -> RecomputePlan | None:
    """Which decoder layers of the trained module (`CausalLMWithLoss`, on its device, prepared) recompute
    their activations in backward, and how: `model.gradient_checkpointing` true: all; `auto`: the fewest
    that fit `model.memory_budget_gib` (measured on this device on a micro-batch of `micro_batch` x
    `seq_len`, packed or not, with the loss fused or not); through distsft's checkpoint in every mode,
    inputs offloaded with `model.offload_checkpoints`. Returns the plan (None when nothing is recomputed)."""
    mode = cfg.gradient_checkpointing
    if mode is False:
        return None
    offload = cfg.offload_checkpoints
    budget = None if cfg.memory_budget_gib is None else int(cfg.memory_budget_gib * 2**30)
    if mode == "auto":
        dtype = next(model.causal_lm.parameters()).dtype
        positions = torch.arange(seq_len).expand(micro_batch, -1)
        extra = packed_attention_kwargs(positions, cfg.attn_implementation, dtype) if packing else {}
        extra = {k: v.to(next(model.parameters()).device) if torch.is_tensor(v) and k == "attention_mask" else v
                 for k, v in extra.items()}
        plan = plan_recomputation(model, batch_size=micro_batch, seq_len=seq_len, budget_bytes=budget,
                                  fused_loss=fused_loss, decoder_kwargs=extra, offload=offload)
    else:
        n = len(decoder_layers(model))
        plan = RecomputePlan(num_layers=n, checkpointed=tuple(range(n)), budget_bytes=None,
                             layer_activation_bytes=0, checkpointed_layer_bytes=0, fixed_bytes=0, shared_bytes=0,
                             head_bytes=0, backward_bytes=0, batch_shape=(micro_batch, seq_len))
    apply_recomputation(model, plan, fn=offloaded_checkpoint if offload else device_checkpoint)
    logger.info("recomputation: %s%s", plan if mode == "auto" else f"all {plan.num_layers} decoder layers",
                " (inputs offloaded to host)" if offload else "")
    return plan
