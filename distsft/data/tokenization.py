"""Rows -> validated examples -> rendered text with trained spans -> token ids and a label mask, with the
length policy applied and every decision listed in a `SourceReport`.

Output per source (`TokenizedSource`): all documents' tokens back to back (`tokens`, int32), a bool
`targets` of the same length (token i is in the loss, predicted from token i-1), document boundaries
(`offsets`, n+1) and the source row of each document (`rows`). This is what the cache stores.

Tokens: the rendered text is tokenized once, with character offsets, and every trained span must start
and end on a token boundary (else the pieces are tokenized separately at the boundaries, as generation
does: the prompt's tokens end where the reply's begin); the tokens of each span must decode to exactly
the span's text, the reply plus the template's end-of-turn (else the row is rejected). Control-token
literals in the data (templates.py marks them) are tokenized as plain text, by a copy of the tokenizer
without its added tokens, so `<|im_end|>` written inside a reply is five ordinary tokens, not EOS; in raw
rows (text, prompt/completion) the same literals are text too.

BOS/EOS: chat rows get what the template renders (plus a BOS in front when the tokenizer's own encoding
adds one and the render has none; a doubled BOS is collapsed); raw rows get BOS (when the tokenizer has
one) and EOS as token ids. EOS is a target like any response token: labels come from spans, never from
comparing ids with the pad id.

Length: a row's characters bound its token count from below (no token is longer than the longest
vocabulary entry), so a huge row is dropped (or its prompt pre-cut) before it is tokenized, and a long one
is measured on a prefix first. `truncate_prompt` cuts raw prompts from the left (BOS kept); for chat rows it
drops whole earlier exchanges (a user turn and the replies, tool calls and tool results that follow it),
keeping the leading system prompt, until the row fits; when one exchange is left it cuts that user
message's tokens from the left, keeping the system prompt and the template's headers. A reply is never
cut; a row that cannot fit is dropped.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from distsft.data.formats import Example, RowRejected, apply_field_map, detect_format, example_for_row, row_format
from distsft.data.report import DataError, Dropped, Rejection, SourceReport
from distsft.data.sources import BadRow, RawSource
from distsft.data.templates import PRIVATE, ChatRenderer, Rendered, unmark

logger = logging.getLogger("distsft.data")

CHUNK_ROWS = 256
DETECT_ROWS = 100
PREFIX_CHARS_PER_TOKEN = 16
"""A row longer than this many characters per allowed token is measured on such a prefix first."""
MIN_ROWS_PER_WORKER = 10_000
"""`num_proc` workers are used only when each gets at least this many rows: starting one costs seconds (it
imports transformers and unpickles the tokenizer) and a row costs ~1 ms, so below this one process is
faster (8,000 GSM8K rows: 3.8-8.6 s in one process, 10-11 s with two workers on a shared 2-core machine)."""

_PRIVATE_SPLIT = re.compile("[" + "".join(PRIVATE) + "]")


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
    line: int | None
    ids: list[int]
    mask: list[bool]
    fmt: str
    note: Rejection | None = None
    """What `truncate_prompt` cut, if anything."""


class _TooLong(Exception):
    """A row measured (or bounded) over `max_seq_len` before its full tokenization."""


@dataclass
class _Toks:
    ids: list[int]
    mask: list[bool]
    starts: np.ndarray
    ends: np.ndarray
    rendered: Rendered | None = None


class TextEncoder:
    """Token ids and character offsets of text pieces, with control-token literals as plain text.

    Works on private copies of the fast tokenizer's backend (no truncation, no padding, no post-processor):
    `normal` matches added tokens, `plain` has none, so a literal is encoded as the text it is. A piece that
    does not start the document is encoded after a newline whose tokens are then dropped, so tokenizers that
    add a prefix space at the start of a string (SentencePiece) do not add one mid-document. Tokenizers
    without a fast backend give no offsets: each piece's tokens get the piece's span."""

    def __init__(self, tokenizer, use_offsets: bool | None = None):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.fast = backend is not None and use_offsets is not False
        if self.fast:
            from tokenizers import Tokenizer

            spec = json.loads(backend.to_str())
            spec["truncation"] = spec["padding"] = spec["post_processor"] = None
            self.normal = Tokenizer.from_str(json.dumps(spec))
            spec["added_tokens"] = []
            self.plain = Tokenizer.from_str(json.dumps(spec))
            self.max_token_chars = max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)
        else:
            self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)
        self.newline = self._encode("\n", plain=False, lead=False)[0]
        self.round_trips = self._probe()
        self.forbidden: set[int] = set()
        """Ids a plain piece must not produce (the control tokens): set by the Encoder."""

    def _encode(self, text: str, *, plain: bool, lead: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
        """ids and offsets (None without a fast backend) of `text`; `lead`: not at the document start."""
        if lead and self.newline:
            ids, offs = self._encode("\n" + text, plain=plain, lead=False)
            k = len(self.newline)
            if ids[:k] == self.newline and (offs is None or all(o[1] <= 1 for o in offs[:k])):
                return ids[k:], None if offs is None else [(s - 1, e - 1) for s, e in offs[k:]]
        if self.fast:
            enc = (self.plain if plain else self.normal).encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        kw = {"split_special_tokens": True} if plain else {}
        return self.tokenizer(text, add_special_tokens=False, **kw).input_ids, None

    def encode_pieces(self, text: str, pieces: list[tuple[int, int, bool]]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Tokens of `text` given as ordered (start, end, plain) pieces (characters between pieces are
        dropped: our markers); offsets in `text` coordinates."""
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        for s, e, plain in pieces:
            if e <= s:
                continue
            piece_ids, offs = self._encode(text[s:e], plain=plain, lead=s > 0)
            if plain and self.forbidden.intersection(piece_ids):
                raise RowRejected("special_token_text", f"the literal {text[s:e]!r:.40} in the data becomes a "
                                  "control token even as plain text (the vocabulary builds it from its characters)")
            ids += piece_ids
            if offs is None or plain:  # a literal is one unit; without offsets, so is a piece
                starts += [s] * len(piece_ids)
                ends += [e] * len(piece_ids)
            else:
                starts += [s + a for a, _ in offs]
                ends += [s + b for _, b in offs]
        return ids, np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        if self.fast:
            return self.normal.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _probe(self) -> bool:
        """Whether any run of tokens that starts on a character decodes to exactly its text (byte-level BPE
        does; decoders that drop a leading space do not), i.e. whether spans can be verified by decoding."""
        if not self.fast:
            return False
        text = "Hello, world!\n\n  Ünïcödé 😀 text\tend. <tag> x"
        enc = self.normal.encode(text, add_special_tokens=False)
        if self.decode(enc.ids) != text:
            return False
        return all(self.decode(enc.ids[k:]) == text[enc.offsets[k][0]:]
                   for k in range(1, len(enc.ids)) if enc.offsets[k][0] != enc.offsets[k - 1][0])


def _token_range(starts: np.ndarray, ends: np.ndarray, a: int, b: int) -> tuple[int, int, bool]:
    """Tokens overlapping [a, b) and whether they lie inside it (none straddles a boundary)."""
    ta = int(np.searchsorted(ends, a, side="right"))  # first token ending after a
    tb = int(np.searchsorted(starts, b, side="left"))  # first token starting at or after b
    n = len(starts)
    inside = (ta >= n or starts[ta] >= a) and (tb == 0 or ends[tb - 1] <= b)
    return ta, tb, inside and ta < tb


class Encoder:
    """Validates, renders and tokenizes chunks of rows and applies the length policy. Picklable, so worker
    processes can run it."""

    def __init__(self, tokenizer, fmt: str, field_map: dict[str, str], template: str, train_on_inputs: bool,
                 max_seq_len: int = 1 << 62, length_policy: str = "drop", use_offsets: bool | None = None,
                 default_format: str | None = None):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.default_format = default_format or (fmt if fmt != "auto" else "unknown")
        self.field_map = dict(field_map)
        self.renderer = ChatRenderer(tokenizer, template)
        self.text = TextEncoder(tokenizer, use_offsets)
        self.train_on_inputs = train_on_inputs
        self.max_seq_len = max_seq_len
        self.policy = length_policy
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        ids = tokenizer("x").input_ids
        self.default_adds_bos = self.bos is not None and len(ids) > 0 and ids[0] == self.bos
        self.text.forbidden = {tokenizer.convert_tokens_to_ids(t) for t in self.renderer.control}

    # ------------------------------------------------------------------------------------------------
    # rows

    def encode_chunk(self, items: list[tuple]) -> list[Encoded | Rejection]:
        return [self.encode_item(*item) for item in items]

    def encode_item(self, file: str, row: int, line: int | None, value) -> Encoded | Rejection:
        try:
            if isinstance(value, BadRow):
                raise RowRejected(value.reason, value.detail)
            ex = example_for_row(apply_field_map(value, self.field_map), self.fmt, self.default_format)
            if ex.messages is not None:
                return self._chat(ex, file, row, line)
            return self._raw(ex, file, row, line)
        except RowRejected as e:
            return Rejection(file, row, e.reason, e.detail, line)
        except RecursionError:  # a row nested deeper than Python's limit (tools, arguments)
            return Rejection(file, row, "wrong_type", "nested too deeply", line)

    def _drop(self, file, row, line, reason: str, detail: str) -> Dropped:
        fatal = self.policy == "raise" and reason in ("too_long", "response_too_long")
        if fatal:
            detail += (f" > data.max_seq_len={self.max_seq_len} (data.length_policy: raise; use drop or "
                       "truncate_prompt, or raise max_seq_len)")
        return Dropped(file, row, reason, detail, line, fatal=fatal)

    def _min_tokens(self, *texts: str) -> int:
        """A lower bound on the tokens of these texts: no token covers more characters than the longest
        vocabulary entry."""
        return sum(len(t) for t in texts) // self.text.max_token_chars

    # ------------------------------------------------------------------------------------------------
    # chat rows

    def _chat(self, ex: Example, file, row, line) -> Encoded | Rejection:
        note = None
        strings = _strings(ex)
        bound = self._min_tokens(*strings)
        if bound > self.max_seq_len:
            last = max(i for i, t in enumerate(ex.trained) if t)
            reply = self._min_tokens(*_strings_of(ex.messages[last]))
            if self.policy != "truncate_prompt":
                return self._drop(file, row, line, "too_long",
                                  f"at least {bound} tokens ({sum(map(len, strings))} characters)")
            if reply > self.max_seq_len:
                return self._drop(file, row, line, "response_too_long",
                                  f"the last reply alone takes at least {reply} tokens")
            ex = self._precut(ex)
            note = "prompt text cut before tokenization"
        try:
            toks = self._chat_tokens(ex)
        except _TooLong as e:
            return self._drop(file, row, line, "too_long", str(e))
        n = len(toks.ids)
        if n <= self.max_seq_len:
            return Encoded(file, row, line, toks.ids, toks.mask, ex.format,
                           Rejection(file, row, "truncated", note, line) if note else None)
        if self.policy != "truncate_prompt":
            return self._drop(file, row, line, "too_long", f"{n} tokens")
        return self._truncate_chat(ex, toks, file, row, line)

    def _precut(self, ex: Example) -> Example:
        """Keep the last C characters of user and tool messages longer than that, C being enough for
        max_seq_len tokens: truncation keeps at most that many anyway, and they are the last ones."""
        keep = (self.max_seq_len + 8) * self.text.max_token_chars
        msgs = [{**m, "content": m["content"][-keep:]} if m["role"] in ("user", "tool") and len(m["content"]) > keep
                else m for m in ex.messages]
        return Example(messages=msgs, trained=ex.trained, tools=ex.tools, format=ex.format)

    def _chat_tokens(self, ex: Example) -> _Toks:
        r = self.renderer.layout(ex)
        text = r.text
        if self.policy != "truncate_prompt" and len(text) > PREFIX_CHARS_PER_TOKEN * self.max_seq_len:
            head = unmark(text[: PREFIX_CHARS_PER_TOKEN * self.max_seq_len])
            n = len(self.text._encode(head, plain=False, lead=False)[0])
            if n > self.max_seq_len + 1:
                raise _TooLong(f"more than {n - 1} tokens in its first {len(head)} characters")
        ids, starts, ends = self._tokens(text, r.marked, r.spans)
        mask = [self.train_on_inputs] * len(ids)
        for (a, b), turn in zip(r.spans, r.turns, strict=True):
            ta, tb, _ = _token_range(starts, ends, a, b)
            if self.text.round_trips:
                got, want = self.text.decode(ids[ta:tb]), unmark(text[a:b])
                if got != want:
                    raise RowRejected("token_alignment", f"assistant turn {turn}: its tokens decode to "
                                      f"{got[:60]!r}..., not to the reply and end-of-turn {want[:60]!r}...")
            mask[ta:tb] = [True] * (tb - ta)
        return self._with_bos(_Toks(ids, mask, starts, ends, r), chat=True)

    def _tokens(self, text: str, marked: bool, spans: list[tuple[int, int]]):
        """Tokenize `text` whole; if a span boundary falls inside a token, again in pieces cut there."""
        ids, starts, ends = self.text.encode_pieces(text, self._pieces(text, marked, (), self.renderer.marked_re))
        if all(_token_range(starts, ends, a, b)[2] for a, b in spans) and self.text.fast:
            return ids, starts, ends
        cuts = sorted({x for s in spans for x in s})
        ids, starts, ends = self.text.encode_pieces(text, self._pieces(text, marked, cuts, self.renderer.marked_re))
        if not all(_token_range(starts, ends, a, b)[2] for a, b in spans):
            raise RowRejected("token_alignment", "a reply's first or last token also covers text outside it")
        return ids, starts, ends

    @staticmethod
    def _pieces(text: str, marked: bool, cuts: Iterable[int], marked_re: re.Pattern) -> list[tuple[int, int, bool]]:
        """(start, end, plain) pieces of `text`: marked literals are plain pieces (their markers dropped),
        a lone marker (a template's string operations can separate one from its partner) is dropped and
        splits the text, and every position in `cuts` starts a new piece."""
        regions: list[tuple[int, int, bool]] = []
        pos = 0
        for m in (marked_re.finditer(text) if marked else ()):
            regions.append((pos, m.start(), False))
            regions.append((m.start(1), m.end(1), True))
            pos = m.end()
        regions.append((pos, len(text), False))
        cuts = sorted(set(cuts))
        out: list[tuple[int, int, bool]] = []
        for s, e, plain in regions:
            if plain:
                out.append((s, e, True))
                continue
            edges = [s, *(c for c in cuts if s < c < e), e]
            for a, b in itertools.pairwise(edges):
                start = a
                for m in (_PRIVATE_SPLIT.finditer(text, a, b) if marked else ()):
                    if m.start() > start:
                        out.append((start, m.start(), False))
                    start = m.end()
                if b > start:
                    out.append((start, b, False))
        return out

    def _with_bos(self, t: _Toks, *, chat: bool) -> _Toks:
        add = self.bos is not None and (not chat or self.default_adds_bos)
        if add and (not t.ids or t.ids[0] != self.bos):
            t.ids.insert(0, self.bos)
            t.mask.insert(0, False)
            t.starts, t.ends = np.insert(t.starts, 0, 0), np.insert(t.ends, 0, 0)
        if self.bos is not None and len(t.ids) >= 2 and t.ids[0] == t.ids[1] == self.bos:
            del t.ids[0], t.mask[0]
            t.starts, t.ends = t.starts[1:], t.ends[1:]
        if self.bos is not None and t.ids and t.ids[0] == self.bos:
            t.mask[0] = False  # never a target: nothing precedes it
        return t

    def _truncate_chat(self, ex: Example, toks: _Toks, file, row, line) -> Encoded | Rejection:
        """Drop whole earlier exchanges (binary search for the fewest), else cut the last user message."""
        msgs = ex.messages
        lead = next((j for j, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
        starts = [lead] + [j for j in range(lead + 1, len(msgs)) if msgs[j]["role"] == "user"]
        groups = len(starts)

        def without(k: int) -> Example:
            keep = list(range(lead)) + list(range(starts[k], len(msgs)))
            return Example(messages=[msgs[j] for j in keep], trained=[ex.trained[j] for j in keep],
                           tools=ex.tools, format=ex.format)

        def attempt(k: int) -> _Toks | None:
            sub = without(k)
            if not any(sub.trained):
                return None
            try:
                return self._chat_tokens(sub)
            except (RowRejected, _TooLong):
                return None

        lo, hi, best = 1, groups - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            t = attempt(mid)
            if t is not None and len(t.ids) <= self.max_seq_len:
                best, hi = (mid, t), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            k, t = best
            gone = starts[k] - lead
            return Encoded(file, row, line, t.ids, t.mask, ex.format, Rejection(
                file, row, "truncated", f"dropped the first {k} of {groups} exchanges ({gone} messages) to fit "
                f"{self.max_seq_len} tokens; system prompt kept", line))
        # one exchange left: cut its user message from the left, keeping the system prompt and the headers
        k = groups - 1
        t = attempt(k) if k > 0 else toks
        if t is None or lead >= len(msgs) or msgs[starts[k]]["role"] != "user":
            return self._drop(file, row, line, "response_too_long", "even the last exchange does not fit")
        r = t.rendered
        where = self.renderer._locate(r.messages, r.tools, lead, r.text) if r is not None else None
        n = len(t.ids)
        if where is None:
            return self._drop(file, row, line, "response_too_long",
                              f"{n} tokens, and the user message could not be located to cut it")
        cs, ce = where
        tu = int(np.searchsorted(t.starts, cs, side="left"))
        tv = int(np.searchsorted(t.ends, ce, side="right"))
        cut = n - self.max_seq_len
        if tv - tu < cut:
            return self._drop(file, row, line, "response_too_long",
                              f"the replies, system prompt and template framing alone take {n - (tv - tu)} tokens")
        ids = t.ids[:tu] + t.ids[tu + cut:]
        mask = t.mask[:tu] + t.mask[tu + cut:]
        what = f"dropped the first {k} of {groups} exchanges and " if k else ""
        return Encoded(file, row, line, ids, mask, ex.format, Rejection(
            file, row, "truncated", f"{what}cut the first {cut} tokens of the user message to fit "
            f"{self.max_seq_len} tokens; system prompt and headers kept", line))

    # ------------------------------------------------------------------------------------------------
    # raw rows (text, prompt_completion)

    def _raw(self, ex: Example, file, row, line) -> Encoded | Rejection:
        prompt, response, note = ex.prompt, ex.response, None
        special = 2  # BOS and EOS
        if self._min_tokens(prompt, response) + special > self.max_seq_len:
            what = "too_long" if self.policy != "truncate_prompt" else "response_too_long"
            if self.policy != "truncate_prompt" or self._min_tokens(response) + special > self.max_seq_len:
                return self._drop(file, row, line, what, f"at least {self._min_tokens(prompt, response)} tokens "
                                  f"({len(prompt) + len(response)} characters)")
            prompt = prompt[-(self.max_seq_len + 8) * self.text.max_token_chars:]
            note = "prompt text cut before tokenization"
        text = prompt + response
        span = (len(prompt), len(text))
        pieces, pos = [], 0
        for m in self.renderer.control_re.finditer(text) if self.renderer.control_re is not None else ():
            pieces += [(pos, m.start(), False), (m.start(), m.end(), True)]  # a control-token literal: text
            pos = m.end()
        pieces.append((pos, len(text), False))
        ids, starts, ends = self.text.encode_pieces(text, pieces)
        ta, tb, inside = _token_range(starts, ends, *span)
        if not inside or not self.text.fast:  # cut at the prompt/response boundary and tokenize again
            cut = [(s, min(e, span[0]), p) for s, e, p in pieces if s < span[0]]
            cut += [(max(s, span[0]), e, p) for s, e, p in pieces if e > span[0]]
            ids, starts, ends = self.text.encode_pieces(text, cut)
            ta, tb, _ = _token_range(starts, ends, *span)
        if self.text.round_trips and self.text.decode(ids[ta:tb]) != response:
            raise RowRejected("token_alignment", f"the response's tokens do not decode to it ({response[:40]!r}...)")
        mask = [self.train_on_inputs] * ta + [True] * (len(ids) - ta)
        if self.eos is not None:
            ids.append(self.eos)
            mask.append(True)
        before = len(ids)
        t = self._with_bos(_Toks(ids, mask, starts, ends), chat=False)
        response_start = ta + len(t.ids) - before  # BOS inserted (+1) or collapsed (-1)
        keep = 1 if self.bos is not None and t.ids and t.ids[0] == self.bos else 0
        n = len(t.ids)
        if n <= self.max_seq_len:
            return Encoded(file, row, line, t.ids, t.mask, ex.format,
                           Rejection(file, row, "truncated", note, line) if note else None)
        if self.policy != "truncate_prompt":
            return self._drop(file, row, line, "too_long", f"{n} tokens")
        cut = n - self.max_seq_len
        if keep + cut > response_start:
            return self._drop(file, row, line, "response_too_long",
                              f"{n} tokens, of which the response takes {n - response_start}")
        return Encoded(file, row, line, t.ids[:keep] + t.ids[keep + cut:], t.mask[:keep] + t.mask[keep + cut:],
                       ex.format, Rejection(file, row, "truncated", f"cut the first {cut} prompt tokens to fit "
                                            f"{self.max_seq_len} tokens", line))


def _strings_of(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings_of(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings_of(v)


def _strings(ex: Example) -> list[str]:
    return list(_strings_of(ex.messages)) + list(_strings_of(ex.tools or []))


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder


def _encode_in_worker(chunk):
    out = _WORKER.encode_chunk(chunk)
    for r in out:  # arrays pickle as bytes; lists of Python ints and bools pickle item by item
        if isinstance(r, Encoded):
            r.ids, r.mask = array("i", r.ids), bytes(r.mask)
    return out


def _majority_format(head: list[tuple], field_map: dict[str, str], name: str) -> str:
    """The format most parsable rows of `head` match; a DataError naming the columns when none matches."""
    counts: Counter[str] = Counter()
    keys: set[str] = set()
    for *_, value in head:
        if isinstance(value, dict):
            mapped = apply_field_map(value, field_map)
            keys |= set(mapped)
            if fmt := row_format(mapped):
                counts[fmt] += 1
    if not keys:  # no parsable row at all: every row is rejected for its own reason
        return "unknown"
    if not counts:
        detect_format(keys, name)  # raises, naming the columns
    return counts.most_common(1)[0][0]


def tokenize_source(raw: RawSource, *, fmt: str, field_map: dict[str, str], tokenizer, template: str,
                    train_on_inputs: bool, max_seq_len: int, length_policy: str, strict: bool,
                    log_rejections: int, num_proc: int = 1, progress: bool = False, role: str = "train",
                    log: bool = True, use_offsets: bool | None = None) -> TokenizedSource:
    """Read, validate, render and tokenize one source; apply the length policy; list every decision."""
    report = SourceReport(name=raw.name, role=role)
    items = iter(raw)
    head = list(itertools.islice(items, DETECT_ROWS))
    default = fmt
    if fmt == "auto":
        while head and not any(isinstance(v, dict) for *_, v in head):  # only unparsable rows so far
            more = list(itertools.islice(items, DETECT_ROWS))
            if not more:
                break
            head += more
        default = _majority_format(head, field_map, raw.name)
    report.format = default
    encoder = Encoder(tokenizer, fmt, field_map, template, train_on_inputs, max_seq_len, length_policy,
                      use_offsets, default_format=default)

    tokens = array("i")
    targets = bytearray()
    offsets = [0]
    rows: list[int] = []
    from tqdm.auto import tqdm

    total = raw.num_rows_hint()
    bar = tqdm(total=total, disable=not progress, desc=f"tokenizing {raw.name}", unit="rows",
               mininterval=1.0, dynamic_ncols=True)
    chunks = _chunks(itertools.chain(head, items), CHUNK_ROWS)
    pool = None
    workers = _workers(num_proc, raw, len(head))
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch/tokenizer threads
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(encoder,))
        results: Iterator[list] = pool.imap(_encode_in_worker, chunks)
    else:
        if num_proc > 1 and log:
            logger.info("%s: tokenizing in one process (data.num_proc=%d: workers need a spare core and "
                        "at least %d rows each)", raw.name, num_proc, MIN_ROWS_PER_WORKER)
        results = map(encoder.encode_chunk, chunks)
    try:
        for chunk in results:
            for r in chunk:
                report.rows_read += 1
                if isinstance(r, Dropped):
                    if r.fatal:
                        raise DataError(str(r))
                    report.add_drop(r)
                elif isinstance(r, Rejection):
                    _reject(report, r, strict=strict, log_rejections=log_rejections, log=log)
                elif not any(r.mask[1:]):  # position 0 is never a target
                    report.add_drop(Rejection(r.file, r.row, "no_trainable_tokens",
                                              "no token of the row is in the loss", r.line))
                else:
                    if r.note is not None:
                        report.truncated += 1
                        report.truncations.append(r.note)
                    report.formats[r.fmt] = report.formats.get(r.fmt, 0) + 1
                    tokens.extend(r.ids)
                    targets.extend(r.mask)
                    offsets.append(len(tokens))
                    rows.append(r.row)
            bar.update(len(chunk))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    report.files = raw.file_reports()
    tok = np.frombuffer(tokens, dtype=np.int32).copy() if len(tokens) else np.zeros(0, np.int32)
    tgt = np.frombuffer(bytes(targets), dtype=np.bool_).copy() if targets else np.zeros(0, bool)
    off = np.asarray(offsets, dtype=np.int64)
    report.accepted = len(rows)
    report.tokens = int(len(tok))
    report.max_token_id = int(tok.max()) if len(tok) else -1
    starts = off[:-1]
    # targets at document starts never count (nothing before them in the document)
    report.target_tokens = int(tgt.sum() - tgt[starts].sum()) if len(rows) else 0
    if log:
        shown = min(log_rejections, report.num_rejected)
        if report.num_rejected > shown:
            logger.warning("%s: %d more rejected rows not shown (by reason: %s; all are listed in "
                           "data_report.json)", raw.name, report.num_rejected - shown, report.rejected)
        if report.drops:
            logger.warning("%s: %d rows dropped (%s), e.g. %s", raw.name, report.num_dropped,
                           ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())), report.drops[0])
    return TokenizedSource(tok, tgt, off, np.asarray(rows, dtype=np.int64), report)


def _workers(num_proc: int, raw: RawSource, head: int) -> int:
    """Worker processes worth starting: no more than the usable cores less one (the main process reads the
    rows and collects the results), and each must get MIN_ROWS_PER_WORKER rows, judged from the row count
    when known, else from the file sizes (at ~200 bytes a row, which undercounts long rows)."""
    if num_proc <= 1:
        return 1
    rows = raw.num_rows_hint()
    if rows is None:
        rows = sum(os.path.getsize(f) for f in raw.files) // 200 if raw.files else head
    return max(1, min(num_proc, usable_cores() - 1, rows // MIN_ROWS_PER_WORKER))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _reject(report: SourceReport, r: Rejection, *, strict: bool, log_rejections: int, log: bool) -> None:
    if strict:
        raise DataError(f"{r} (data.strict is on: the first bad row stops the run)")
    report.add_rejection(r)
    if log and report.num_rejected <= log_rejections:
        logger.warning("rejected %s", r)
