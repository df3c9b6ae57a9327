"""Checkpointed decoder layers, their saved input on the GPU or in pinned host memory
(`model.gradient_checkpointing`, `model.offload_checkpoints`).

A checkpointed layer keeps only its input hidden states (B, T, d) for the backward pass, which recomputes
the layer from them. At long context these inputs are what is left: Llama-3.1-8B at 131,072 tokens keeps
32 x 1 GiB. Offloading moves each input to pinned CPU memory during the forward and brings it back just
before its layer's backward:

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

This is a reentrant checkpoint (the layer's backward runs inside this node's backward), used by the
single-process path. Use: `layer._gradient_checkpointing_func = offloaded_checkpoint` (or
`device_checkpoint`) on transformers' GradientCheckpointingLayer, which calls it as
`fn(partial(forward, layer, **kwargs), hidden_states)`.
"""

from __future__ import annotations

import weakref

import torch

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}
_last_forward = None  # weakref to the ctx of the most recent forward: the next one's predecessor
_recompute_depth = 0
_GRAD_ANCHOR = torch.zeros((), requires_grad=True)
"""An input that requires grad, so the node is recorded even when the hidden states do not (layer 0's
input is the frozen embedding's output); the layer's LoRA gradients are produced inside its backward."""


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed for its backward."""
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
