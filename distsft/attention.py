"""Attention over packed documents, in one home: what keeps each packed document to itself, whichever
attention implementation runs, and `model.attn_implementation: distsft_varlen`.

A packed row's document structure is in its `position_ids` alone (distsft/data/packing.py): a new
document starts wherever a position is not the previous one plus 1 (`document_ids`). From that:

* `document_attention_mask` -> (B, 1, T, T) additive mask (causal AND same document) for HF eager/sdpa;
  transformers passes a 4-D mask through unchanged (masking_utils returns early for 4-D masks).
* `cu_seqlens_from_position_ids` -> the varlen interface (flash-attn `cu_seqlens`/`max_seqlen` over
  the flattened batch) that distsft_varlen reads; `document_ids` is the flex-attention `mask_mod`
  input (`doc[b, q] == doc[b, kv] and kv <= q`).
* `packed_attention_kwargs` -> whichever of those the configured implementation needs, per micro-batch;
  `check_packing_isolation` -> the startup self-check that documents really cannot see each other
  (`check_wrapper_isolation`: the same through the trained module, as the trainer calls it).

Note for callers: with `attention_mask=None`, transformers >= 5.17 derives a block-diagonal mask from
`position_ids` (`find_packed_sequence_indices`) ONLY when there is no cache: a forward without
`use_cache=False` builds a DynamicCache (config.use_cache defaults to True) and the documents then see
each other; a 2-D all-ones `attention_mask` switches the detection off too. Pass the 4-D mask (works
either way), or `use_cache=False` and no mask; `check_packing_isolation` checks whichever call is used.

distsft_varlen: packed documents attend within themselves through variable-length flash attention, with
no (B, 1, T, T) mask. SDPA keeps packed documents apart only through a float block-diagonal mask, which
also takes it off its flash kernel (at 8,192 tokens per row that cost ~40% of the step on an H100). Here
the packed batch is described by cumulative document lengths over the flattened B*T tokens (`cu_seqlens`,
computed once per micro-batch on the CPU by `packed_attention_kwargs`) and every layer runs
`torch.nn.attention.varlen.varlen_attn` on it:

    q (B, Hq, T, D) -> (B*T, Hq, D)     a view: the projections wrote (B, T, H, D), attention sees it transposed
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale, window=(-1, 0))  # causal
    out (B*T, Hq, D) -> (B, T, Hq, D)   what transformers' attention interface returns

Registered through transformers' `AttentionInterface` (its extension point, no HF function is replaced);
with no mask function registered for the name, transformers builds no mask at all. Batches without
`cu_seq_lens_q` (unpacked: padding only at the end of each row, after the causal horizon of every real
token) run SDPA's causal flash path. On CPU, where varlen_attn has no kernel, the same semantics run
through SDPA with a boolean document-causal mask, so tests exercise the plumbing everywhere.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

NAME = "distsft_varlen"


def resolve(name: str, device: torch.device) -> str:
    """`auto` -> distsft_varlen on CUDA, sdpa elsewhere (its CPU fallback exists for tests, not speed)."""
    if name != "auto":
        return name
    return NAME if torch.device(device).type == "cuda" else "sdpa"


def register() -> None:
    """Make `attn_implementation="distsft_varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


@functools.cache
def _varlen_gqa_kwarg() -> bool:
    """torch >= 2.12's varlen_attn takes `enable_gqa`; 2.11's computes GQA natively without asking."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _document_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """(total, total) bool: query t may see key s iff s <= t in the same document."""
    doc = torch.zeros(total, dtype=torch.long, device=device)
    doc[cu_seqlens[1:-1].long()] = 1
    doc = doc.cumsum(0)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return causal & (doc[:, None] == doc[None, :])


def varlen_attention_forward(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, **kwargs):
    """transformers attention interface: query (B, Hq, T, D), key/value (B, Hk, T, D) -> ((B, T, Hq, D), None)."""
    if dropout:
        raise ValueError(f"{NAME}: attention dropout is not supported (got {dropout})")
    if softcap is not None:
        raise ValueError(f"{NAME}: attention logit soft-capping (Gemma 2) is not supported; use eager")
    b, hq, t, d = query.shape
    hk = key.shape[1]
    if sliding_window is not None and sliding_window < t:
        raise ValueError(f"{NAME}: sliding-window attention ({sliding_window} < {t} tokens) is not supported; "
                         "use sdpa")
    # Unpacked rows (no lengths), or packed rows that each hold one whole document (b documents, the
    # longest t tokens: every row is one; host integers, no sync): plain causal attention, through SDPA,
    # whose cuDNN/flash kernels beat the varlen kernel there (8B QLoRA at 2 x 2048 on an H100: 11,316
    # and 11,234 tokens/s against 10,623 and 10,259 through varlen_attn, launch/results/e2e_h100.md).
    if cu_seq_lens_q is None or (cu_seq_lens_q.numel() == b + 1 and int(max_length_q) == t):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=hq != hk)
        return out.transpose(1, 2), None
    total = b * t
    cu = cu_seq_lens_q.to(query.device, torch.int32)
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        q = query.transpose(1, 2).reshape(total, hq, d)  # (B*T, Hq, D), a view of the projection output
        k = key.transpose(1, 2).reshape(total, hk, d)
        v = value.transpose(1, 2).reshape(total, hk, d)
        extra = {"enable_gqa": True} if hq != hk and _varlen_gqa_kwarg() else {}
        out = varlen_attn(q, k, v, cu, cu, int(max_length_q), int(max_length_q), scale=scaling,
                          window_size=(-1, 0), **extra)
        return out.view(b, t, hq, d), None
    # CPU: the same attention pattern through SDPA over the flattened tokens, (1, H, B*T, D)
    mask = _document_causal_mask(cu, total, query.device)
    q, k, v = (x.transpose(0, 1).reshape(x.shape[1], total, d)[None] for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=hq != hk)
    return out[0].transpose(0, 1).reshape(b, t, hq, d), None  # (H, B*T, D) -> (B, T, H, D)


# ----------------------------------------------------------------------------------------------------
# Keeping packed documents apart, whichever implementation runs


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document starts (column 0, or a position that is not previous + 1)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: 1-based index of the document each token belongs to, within its row."""
    return document_starts(position_ids).long().cumsum(-1)


def document_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask, 0 where query t may attend key s (s <= t, same document) and
    `finfo(dtype).min` elsewhere. Every row allows at least its diagonal, so softmax never sees an
    all-masked row."""
    doc = document_ids(position_ids)  # (B, T)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Varlen attention interface: (cu_seqlens (num_docs + 1,) int32, max_seqlen) over the flattened
    (B*T) tokens, with a boundary at every row start; padding counts as its own documents."""
    starts = document_starts(position_ids).flatten()
    idx = torch.nonzero(starts).flatten()
    total = torch.tensor([starts.numel()], device=idx.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    return cu, max_seqlen


MASK_IMPLEMENTATIONS = ("eager", "sdpa")
VARLEN_IMPLEMENTATIONS = (NAME,)


def packed_attention_kwargs(position_ids: torch.Tensor, attn_implementation: str,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Extra forward kwargs that keep packed documents apart: the 4-D mask for eager/sdpa; cumulative
    document lengths for distsft_varlen (compute them from CPU position_ids: no device sync); nothing for
    the other varlen-style backends (flash_attention_*, flex_attention), which transformers feeds from
    `position_ids` when `attention_mask` is None. Run `check_packing_isolation` on whichever is used."""
    if attn_implementation in MASK_IMPLEMENTATIONS:
        return {"attention_mask": document_attention_mask(position_ids, dtype)}
    if attn_implementation in VARLEN_IMPLEMENTATIONS:
        cu, max_len = cu_seqlens_from_position_ids(position_ids)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
    return {}


class PackingIsolationError(RuntimeError):
    """An attention backend lets packed documents see each other."""


def _model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def check_packing_isolation(model, *, attn_implementation: str | None = None,
                            lengths: Sequence[int] = (7, 12, 5), use_document_mask: bool | None = None,
                            forward: Callable | None = None, seed: int = 0, rtol: float | None = None) -> dict:
    """Startup self-check that packed documents cannot see each other, two ways:

    1. swap: for each document, the row is run again with every *other* document replaced by different
       random tokens of the same length. Same shapes, so the same kernels and the same arithmetic per
       row: an isolated document's logits do not move (bitwise, up to the last ulp), a leaking one's
       do. This is the leak test, equally sharp in fp32 and bf16 and at any depth.
    2. alone: each document's logits in the packed row against the document run alone (positions from
       0), which also catches gross errors (e.g. a mask that hides a document from itself). The shapes
       differ, so GEMMs and attention tile differently and the difference is rounding carried through
       every layer: tight in fp32, loose in half precision (a random-init Llama-3.1-8B in bf16 differs
       by ~4.5% of its logit scale on an H100 here with every backend, sdpa with the document mask included).

    `model` is an HF causal LM (or a peft model around one); `forward(input_ids, position_ids,
    attention_mask)` -> logits overrides how it is called (e.g. a wrapper that owns the LM head).
    `use_document_mask` (default: True for eager/sdpa, else False) passes `document_attention_mask`;
    otherwise only `position_ids` separate the documents. Raises `PackingIsolationError` naming the
    attention implementation when either difference exceeds its tolerance (swap: `rtol * max(|logits|, 1)`,
    rtol 1e-4 in fp32, 1e-3 in half precision; alone: 1e-4 in fp32, 0.25 in half precision). Returns the
    measured numbers."""
    config = getattr(model, "config", None)
    impl = attn_implementation or getattr(config, "_attn_implementation", None) or "unknown"
    if use_document_mask is None:
        use_document_mask = impl in MASK_IMPLEMENTATIONS
    dtype = _model_dtype(model)
    device = next(model.parameters()).device
    vocab = config.vocab_size
    if forward is None:
        def forward(input_ids, position_ids, attention_mask):
            kw = {} if attention_mask is None else {"attention_mask": attention_mask}
            return model(input_ids=input_ids, position_ids=position_ids, **kw).logits

    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    others = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    positions = [torch.arange(n) for n in lengths]
    pos = torch.cat(positions)[None].to(device)
    mask = document_attention_mask(pos, dtype) if use_document_mask else None

    def packed_row(i: int | None) -> torch.Tensor:
        """The packed row's logits; with `i`, every document but the i-th swapped for other tokens."""
        row = torch.cat([d if i is None or j == i else o for j, (d, o) in enumerate(zip(docs, others, strict=True))])
        return forward(row[None].to(device), pos, mask)[0].float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [forward(d[None].to(device), p[None].to(device), None)[0].float()
                     for d, p in zip(docs, positions, strict=True)]
            packed = packed_row(None)
            swapped = [packed_row(i).split(list(lengths))[i] for i in range(len(lengths))]
    finally:
        model.train(was_training)
    mine = packed.split(list(lengths))
    diffs = [float((p - a).abs().max()) for p, a in zip(mine, alone, strict=True)]
    swap_diffs = [float((p - s).abs().max()) for p, s in zip(mine, swapped, strict=True)]
    scale = max(1.0, max(float(a.abs().max()) for a in alone))
    half = dtype != torch.float32
    swap_tol = (rtol if rtol is not None else 1e-3 if half else 1e-4) * scale
    tol = (rtol if rtol is not None else 0.25 if half else 1e-4) * scale
    err, swap_err = max(diffs), max(swap_diffs)
    result = {"attn_implementation": impl, "document_mask": use_document_mask, "max_abs_diff": err,
              "per_document": diffs, "tolerance": tol, "swap_max_abs_diff": swap_err,
              "swap_per_document": swap_diffs, "swap_tolerance": swap_tol}
    if not (swap_err <= swap_tol and err <= tol):  # also catches NaN
        how = "document_attention_mask" if use_document_mask else "position_ids only"
        raise PackingIsolationError(
            f"attention implementation {impl!r} leaks across packed documents ({how}): a document's logits "
            f"move by up to {swap_err:.3g} when the other documents of its row change (per document "
            f"{[f'{d:.3g}' for d in swap_diffs]}, tolerance {swap_tol:.3g}), and differ from the document run "
            f"alone by up to {err:.3g} (per document {[f'{d:.3g}' for d in diffs]}, tolerance {tol:.3g}). Use "
            "eager or sdpa with document_attention_mask, or set data.packing=false."
        )
    return result


def check_wrapper_isolation(wrapper, attn_implementation: str, device: torch.device, dtype: torch.dtype) -> dict:
    """`check_packing_isolation` through the trained module (`CausalLMWithLoss`: its `logits`), called as the
    loop calls it: document lengths for the varlen implementations, else the document mask. Every rank runs
    it (under ZeRO-3 the prepared engine's hooks gather the weights for the probe's forwards)."""
    def probe(ids, pos, mask):
        kw = {} if mask is None else {"attention_mask": mask.to(device)}
        if attn_implementation in VARLEN_IMPLEMENTATIONS:
            kw = packed_attention_kwargs(pos, attn_implementation, dtype)  # document lengths, not a mask
        return wrapper.logits(ids.to(device), pos.to(device), **kw)

    return check_packing_isolation(wrapper.causal_lm, attn_implementation=attn_implementation, forward=probe)
