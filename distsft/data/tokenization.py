"""Rows -> validated examples -> rendered text with trainable spans -> token ids and a label mask, with
the length policy applied and every decision counted in a `SourceReport`.

Output per source (`TokenizedSource`): all documents' tokens back to back (`tokens`, int32), a bool
`targets` of the same length (token i is in the loss, predicted from token i-1), document boundaries
(`offsets`, n+1) and the source row of each document (`rows`). This is what the cache stores.

BOS/EOS: chat rows get what the template renders (plus a BOS in front when the tokenizer's own
encoding adds one and the render has none; a doubled BOS is collapsed); raw rows (text,
prompt_completion) get BOS (when the tokenizer has one) and EOS as token ids, so a literal "</s>" in
the data is not mistaken for one. EOS is a target like any response token: labels come from spans,
never from comparing ids with the pad id.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from distsft.data.formats import Example, RowRejected, apply_field_map, detect_format, to_example
from distsft.data.report import DataError, Rejection, SourceReport
from distsft.data.sources import BadRow, RawSource
from distsft.data.templates import ChatRenderer

logger = logging.getLogger("distsft.data")

CHUNK_ROWS = 256
DETECT_ROWS = 100


@dataclass
class TokenizedSource:
    tokens: np.ndarray   # (total,) int32
    targets: np.ndarray  # (total,) bool: token i is predicted from token i-1 inside its document
    offsets: np.ndarray  # (n + 1,) int64
    rows: np.ndarray     # (n,) int64 source row index of each document
    report: SourceReport

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Encoded:
    file: str
    row: int
    ids: list[int]
    mask: list[bool]
    response_start: int
    """Token index where the last response starts: `truncate_prompt` may cut only tokens before it."""
    keep_prefix: int
    """Leading tokens truncation keeps (the BOS)."""


class Encoder:
    """Validates, renders and tokenizes chunks of rows. Picklable, so worker processes can run it."""

    def __init__(self, tokenizer, fmt: str, field_map: dict[str, str], template: str, train_on_inputs: bool,
                 use_offsets: bool | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.field_map = dict(field_map)
        self.renderer = ChatRenderer(tokenizer, template)
        self.train_on_inputs = train_on_inputs
        self.use_offsets = bool(getattr(tokenizer, "is_fast", False)) if use_offsets is None else use_offsets
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        ids = tokenizer("x").input_ids
        self.default_adds_bos = self.bos is not None and len(ids) > 0 and ids[0] == self.bos

    def encode_chunk(self, items: list[tuple[str, int, dict | BadRow]]) -> list[Encoded | Rejection]:
        out: list[Encoded | Rejection | None] = []
        pending: list[tuple[int, str, list[tuple[int, int]], bool]] = []  # (slot, text, spans, is_chat)
        for file, row, value in items:
            try:
                if isinstance(value, BadRow):
                    raise RowRejected(value.reason, value.detail)
                ex = to_example(apply_field_map(value, self.field_map), self.fmt)
                text, spans, is_chat = self._render(ex)
            except RowRejected as e:
                out.append(Rejection(file, row, e.reason, e.detail))
                continue
            pending.append((len(out), text, spans, is_chat))
            out.append(None)
        texts = [p[1] for p in pending]
        if self.use_offsets and texts:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            tokenized = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        else:
            tokenized = (self._encode_segments(text, spans) for _, text, spans, _ in pending)
        for (slot, _, spans, is_chat), (ids, offs) in zip(pending, tokenized, strict=True):
            file, row, _ = items[slot]
            out[slot] = self._finish(file, row, list(ids), offs, spans, is_chat)
        return out  # type: ignore[return-value]

    def _render(self, ex: Example) -> tuple[str, list[tuple[int, int]], bool]:
        if ex.messages is not None:
            text, spans = self.renderer.render_with_spans(ex.messages)
            return text, spans, True
        text = ex.prompt + ex.response
        return text, [(len(ex.prompt), len(text))], False

    def _encode_segments(self, text: str, spans: list[tuple[int, int]]):
        """Tokenizers without offsets: tokenize the text piece by piece at the span boundaries, so each
        token lies inside or outside every span by construction."""
        cuts = sorted({0, len(text), *(x for s in spans for x in s)})
        ids: list[int] = []
        offs: list[tuple[int, int]] = []
        for a, b in itertools.pairwise(cuts):
            piece = self.tokenizer(text[a:b], add_special_tokens=False).input_ids
            ids += piece
            offs += [(a, b)] * len(piece)
        return ids, offs

    def _finish(self, file, row, ids, offs, spans, is_chat) -> Encoded:
        n = len(ids)
        starts = np.fromiter((o[0] for o in offs), dtype=np.int64, count=n)
        ends = np.fromiter((o[1] for o in offs), dtype=np.int64, count=n)
        in_span = np.zeros(n, dtype=bool)
        for a, b in spans:  # a token belongs to a span when its characters overlap it
            in_span |= ((starts < b) & (ends > a)) | ((starts == ends) & (starts >= a) & (starts < b))
        last_a, last_b = spans[-1]
        hits = np.flatnonzero((starts < last_b) & (ends > last_a))
        response_start = int(hits[0]) if len(hits) else n
        mask = np.ones(n, dtype=bool) if self.train_on_inputs else in_span
        mask = mask.tolist()
        if not is_chat and self.eos is not None:
            ids.append(self.eos)
            mask.append(True)
        add_bos = self.bos is not None and (not is_chat or self.default_adds_bos)
        if add_bos and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
            mask.insert(0, False)
            response_start += 1
        if self.bos is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos:
            del ids[0], mask[0]
            response_start -= 1
        keep = 1 if self.bos is not None and ids and ids[0] == self.bos else 0
        if keep:
            mask[0] = False  # never a target: nothing precedes it
        return Encoded(file, row, ids, mask, max(response_start, keep), keep)


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder


def _encode_in_worker(chunk):
    return _WORKER.encode_chunk(chunk)


def tokenize_source(raw: RawSource, *, fmt: str, field_map: dict[str, str], tokenizer, template: str,
                    train_on_inputs: bool, max_seq_len: int, length_policy: str, strict: bool,
                    log_rejections: int, num_proc: int = 1, progress: bool = False, role: str = "train",
                    log: bool = True, use_offsets: bool | None = None) -> TokenizedSource:
    """Read, validate, render and tokenize one source; apply the length policy; count everything."""
    report = SourceReport(name=raw.name, role=role)
    items = iter(raw)
    head = list(itertools.islice(items, DETECT_ROWS))
    if fmt == "auto":
        while head and not any(isinstance(v, dict) for _, _, v in head):  # only unparsable rows so far
            more = list(itertools.islice(items, DETECT_ROWS))
            if not more:
                break
            head += more
        keys: set[str] = set()
        for _, _, value in head:
            if isinstance(value, dict):
                keys |= set(apply_field_map(value, field_map))
        # no parsable row at all: nothing to detect, every row is rejected for its own reason
        fmt = detect_format(keys, raw.name) if keys else "unknown"
    report.format = fmt
    encoder = Encoder(tokenizer, fmt, field_map, template, train_on_inputs, use_offsets)

    tokens = array("i")
    targets = bytearray()
    offsets = [0]
    rows: list[int] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=raw.num_rows_hint(), disable=not progress, desc=f"tokenizing {raw.name}", unit="rows",
               mininterval=1.0, dynamic_ncols=True)
    chunks = _chunks(itertools.chain(head, items), CHUNK_ROWS)
    pool = None
    if num_proc > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch/tokenizer threads
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(encoder,))
        results: Iterator[list] = pool.imap(_encode_in_worker, chunks)
    else:
        results = map(encoder.encode_chunk, chunks)
    try:
        for chunk in results:
            for r in chunk:
                report.rows_read += 1
                if isinstance(r, Rejection):
                    _reject(report, r, strict=strict, log_rejections=log_rejections, log=log)
                    continue
                r = _apply_length_policy(r, report, max_seq_len, length_policy)
                if r is None:
                    continue
                if not any(r.mask[1:]):  # position 0 is never a target
                    report.dropped["no_trainable_tokens"] = report.dropped.get("no_trainable_tokens", 0) + 1
                    continue
                tokens.extend(r.ids)
                targets.extend(r.mask)
                offsets.append(len(tokens))
                rows.append(r.row)
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    tok = np.frombuffer(tokens, dtype=np.int32).copy() if len(tokens) else np.zeros(0, np.int32)
    tgt = np.frombuffer(bytes(targets), dtype=np.bool_).copy() if targets else np.zeros(0, bool)
    off = np.asarray(offsets, dtype=np.int64)
    report.accepted = len(rows)
    report.tokens = int(len(tok))
    starts = off[:-1]
    # targets at document starts never count (nothing before them in the document)
    report.target_tokens = int(tgt.sum() - tgt[starts].sum()) if len(rows) else 0
    if log and report.num_rejected > len(report.rejected_examples):
        logger.warning("%s: %d more rejected rows not shown (by reason: %s)", raw.name,
                       report.num_rejected - len(report.rejected_examples), report.rejected)
    return TokenizedSource(tok, tgt, off, np.asarray(rows, dtype=np.int64), report)


def _reject(report: SourceReport, r: Rejection, *, strict: bool, log_rejections: int, log: bool) -> None:
    if strict:
        raise DataError(f"{r} (data.strict is on: the first bad row stops the run)")
    report.rejected[r.reason] = report.rejected.get(r.reason, 0) + 1
    if len(report.rejected_examples) < log_rejections:
        report.rejected_examples.append(r)
        if log:
            logger.warning("rejected %s", r)


def _apply_length_policy(r: Encoded, report: SourceReport, max_seq_len: int, policy: str) -> Encoded | None:
    n = len(r.ids)
    if n <= max_seq_len:
        return r
    if policy == "raise":
        raise DataError(
            f"{r.file} row {r.row}: {n} tokens > data.max_seq_len={max_seq_len} (data.length_policy: raise; "
            "use drop or truncate_prompt, or raise max_seq_len)"
        )
    if policy == "truncate_prompt":
        cut = n - max_seq_len
        if r.keep_prefix + cut <= r.response_start:  # only prompt tokens go, oldest first; BOS stays
            k = r.keep_prefix
            r.ids = r.ids[:k] + r.ids[k + cut:]
            r.mask = r.mask[:k] + r.mask[k + cut:]
            r.response_start -= cut
            report.truncated += 1
            return r
        report.dropped["response_too_long"] = report.dropped.get("response_too_long", 0) + 1
        return None
    report.dropped["too_long"] = report.dropped.get("too_long", 0) + 1
    return None
