"""Packing documents into fixed-size slots, batching them, and keeping attention inside each document.

Layout of one packed row (T tokens, documents d0 d1 d2, then padding from `collate`):

    input_ids     d0 d0 d0 d0 d1 d1 d1 d2 d2 | pad pad pad
    position_ids   0  1  2  3  0  1  2  0  1 |   0   1   2     runs 0,1,2,... mark the documents
    target_ids    next-token of the same document, -100 at each document's last token, on masked
                  prompt tokens and on padding (targets are shifted here, never in the model)

Everything downstream derives the document structure from `position_ids` alone: a new document starts
wherever a position is not the previous one plus 1 (`document_ids`). From that:

* `document_attention_mask` -> (B, 1, T, T) additive mask (causal AND same document) for HF eager/sdpa;
  transformers passes a 4-D mask through unchanged (masking_utils returns early for 4-D masks).
* `cu_seqlens_from_position_ids` -> the varlen interface (flash-attn `cu_seqlens`/`max_seqlen` over
  the flattened batch) the GPU fast path plugs into; `document_ids` is the flex-attention `mask_mod`
  input (`doc[b, q] == doc[b, kv] and kv <= q`).

Note for callers: with `attention_mask=None`, transformers >= 5.17 derives a block-diagonal mask from
`position_ids` (`find_packed_sequence_indices`) ONLY when there is no cache: a forward without
`use_cache=False` builds a DynamicCache (config.use_cache defaults to True) and the documents then see
each other; a 2-D all-ones `attention_mask` switches the detection off too. Pass the 4-D mask (works
either way), or `use_cache=False` and no mask; `check_packing_isolation` checks whichever call is used.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np
import torch

from distsft.data.tokenization import TokenizedSource

IGNORE_INDEX = -100


def pack_best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing: documents longest first (ties by index), each into the open slot
    with the least room that still fits it, else a new slot. Deterministic. Returns CSR arrays
    `(slot_offsets (S+1,), slot_docs (N,))`: slot s holds documents `slot_docs[slot_offsets[s]:slot_offsets[s+1]]`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a document of {int(lengths.max())} tokens does not fit a slot of {capacity}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    rooms: list[int] = []              # sorted distinct free-room values of the open slots
    by_room: dict[int, list[int]] = {}  # free room -> slots with that room
    slots: list[list[int]] = []
    for d in order.tolist():
        n = int(lengths[d])
        j = bisect.bisect_left(rooms, n)
        if j < len(rooms):
            room = rooms[j]
            s = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(j)
            slots[s].append(d)
            left = room - n
        else:
            s = len(slots)
            slots.append([d])
            left = capacity - n
        if left > 0:
            if left not in by_room:
                bisect.insort(rooms, left)
                by_room[left] = []
            by_room[left].append(s)
    offsets = np.zeros(len(slots) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in slots])
    docs = np.fromiter((d for s in slots for d in s), dtype=np.int64, count=int(offsets[-1]))
    return offsets, docs


class PackedDataset(torch.utils.data.Dataset):
    """`ds[i]` -> {input_ids, position_ids, target_ids}: 1-D LongTensors of one slot (packing on) or one
    document (packing off). Documents are referenced, not copied: the token arrays stay memory-mapped."""

    def __init__(self, sources: Sequence[TokenizedSource], doc_source: np.ndarray, doc_index: np.ndarray,
                 *, max_seq_len: int, packing: bool):
        self.sources = list(sources)
        self.doc_source = np.asarray(doc_source, dtype=np.int64)
        self.doc_index = np.asarray(doc_index, dtype=np.int64)
        self.max_seq_len = max_seq_len
        self.packing = packing
        self.doc_lengths = np.zeros(len(self.doc_index), dtype=np.int64)
        self.doc_targets = np.zeros(len(self.doc_index), dtype=np.int64)
        for s, src in enumerate(self.sources):
            sel = self.doc_source == s
            if not sel.any():
                continue
            off = np.asarray(src.offsets)
            flags = np.asarray(src.targets, dtype=np.int64)
            # targets at a document's first token never count: nothing in the document precedes it
            per_doc = np.add.reduceat(flags, off[:-1]) - flags[off[:-1]]
            self.doc_lengths[sel] = np.diff(off)[self.doc_index[sel]]
            self.doc_targets[sel] = per_doc[self.doc_index[sel]]
        if packing:
            self.slot_offsets, self.slot_docs = pack_best_fit_decreasing(self.doc_lengths, max_seq_len)
        else:
            self.slot_offsets = np.arange(len(self.doc_lengths) + 1, dtype=np.int64)
            self.slot_docs = np.arange(len(self.doc_lengths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.slot_offsets) - 1

    def documents(self, i: int) -> np.ndarray:
        """Global document ids in sample `i`."""
        return self.slot_docs[self.slot_offsets[i]: self.slot_offsets[i + 1]]

    def document(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, target flags) of document `g`."""
        src = self.sources[int(self.doc_source[g])]
        j = int(self.doc_index[g])
        a, b = int(src.offsets[j]), int(src.offsets[j + 1])
        return np.asarray(src.tokens[a:b], dtype=np.int64), np.asarray(src.targets[a:b], dtype=bool)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids_parts, pos_parts, tgt_parts = [], [], []
        for g in self.documents(i).tolist():
            ids, flags = self.document(g)
            tgt = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
            tgt[:-1] = np.where(flags[1:], ids[1:], IGNORE_INDEX)  # shift inside the document only
            ids_parts.append(ids)
            pos_parts.append(np.arange(len(ids), dtype=np.int64))
            tgt_parts.append(tgt)
        return {
            "input_ids": torch.from_numpy(np.concatenate(ids_parts)),
            "position_ids": torch.from_numpy(np.concatenate(pos_parts)),
            "target_ids": torch.from_numpy(np.concatenate(tgt_parts)),
        }

    def sample_lengths(self) -> np.ndarray:
        """Tokens in each sample (before padding)."""
        return np.add.reduceat(self.doc_lengths[self.slot_docs], self.slot_offsets[:-1]) if len(self) else \
            np.zeros(0, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    @property
    def num_target_tokens(self) -> int:
        return int(self.doc_targets.sum())

    @property
    def slot_tokens(self) -> int:
        return len(self) * self.max_seq_len if self.packing else self.num_tokens

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / slot tokens (`len(self) * max_seq_len`) when packing."""
        return self.num_tokens / self.slot_tokens if self.slot_tokens else 0.0


def collate(samples: list[dict], pad_token_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Pad samples to (B, T), T = the longest rounded up to `pad_to_multiple_of`. Padding gets
    `pad_token_id`, target -100 and positions 0,1,2,... (its own document, so it never joins a real one)."""
    if not samples:
        raise ValueError("collate: empty batch")
    t = max(len(s["input_ids"]) for s in samples)
    if pad_to_multiple_of and pad_to_multiple_of > 1:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    b = len(samples)
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    target_ids = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = s["input_ids"]
        target_ids[i, :n] = s["target_ids"]
        position_ids[i, :n] = s["position_ids"]
        position_ids[i, n:] = torch.arange(t - n)
    return {"input_ids": input_ids, "position_ids": position_ids, "target_ids": target_ids}


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
VARLEN_IMPLEMENTATIONS = ("distsft_varlen",)  # distsft/attention.py


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
