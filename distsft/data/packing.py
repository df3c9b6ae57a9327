"""Packing documents into fixed-size slots and batching them.

Layout of one packed row (T tokens, documents d0 d1 d2, then padding from `collate`):

    input_ids     d0 d0 d0 d0 d1 d1 d1 d2 d2 | pad pad pad
    position_ids   0  1  2  3  0  1  2  0  1 |   0   1   2     runs 0,1,2,... mark the documents
    target_ids    next-token of the same document, IGNORE_INDEX (-100) at each document's last token, on masked
                  prompt tokens and on padding (targets are shifted here, never in the model)

Everything downstream derives the document structure from `position_ids` alone: a new document starts
wherever a position is not the previous one plus 1. Keeping attention inside each document (the 4-D
document mask, the varlen `cu_seqlens`, the startup isolation self-check) is distsft/attention.py's.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from distsft.data.tokenization import TokenizedSource
from distsft.loss import IGNORE_INDEX


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
