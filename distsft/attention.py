"""`model.attn_implementation: distsft_varlen`: packed documents attend within themselves through
variable-length flash attention, with no (B, 1, T, T) mask.

SDPA keeps packed documents apart only through a float block-diagonal mask, which also takes it off its
flash kernel (at 8,192 tokens per row that cost ~40% of the step on an H100). Here the packed batch is
described by cumulative document lengths over the flattened B*T tokens (`cu_seqlens`, computed once per
micro-batch on the CPU by `distsft.data.packed_attention_kwargs`) and every layer runs
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
