"""Chat templates, the character spans of what is trained on, and control-token literals kept as text.

Where each assistant reply is (structural, never a search of the rendered text for the reply):

    full   = render(messages)                                   # the document that is trained
    before = render(messages[:i], add_generation_prompt=True)   # where the model starts writing turn i
    upto   = render(messages[:i+1])                             # ... and where its turn (reply + end-of-turn) ends
    added  = upto[len(before):]                                 # what turn i adds, as the model would write it

  A. `full` starts with `upto` (most templates, every last turn): the span is [len(before), len(upto)).
  B. The template renders turn i differently once later turns follow (it rewrites history):
     (i)  `full` still starts with `before`: the turn starts there, and the span is the longest tail of
          `added` that `full` holds at that position (Qwen3 drops the empty `<think></think>` block, and
          any reasoning, from replies before the last user message);
     (ii) otherwise the reply's content is located by rendering the conversation again with that one
          content wrapped in two private-use sentinels: the characters where the two renders differ are
          where the template writes it (Mistral v0.3 moves the system prompt into the last user turn, so
          the text before an earlier reply changes). The span is that content plus the end-of-turn text
          the template writes after it.
  Then every span is verified: the reply's text, its reasoning and its tool calls must be inside it, else
  the row is rejected with the reason (e.g. a template that drops an earlier turn's reasoning, or one that
  cannot render tool calls at all). tokenization.py verifies the tokens of each span decode to it exactly.

Control tokens in data stay text: every string of the row (contents, reasoning, tool calls, tool schemas)
has the tokenizer's control tokens (special added tokens, and added tokens the template writes, such as
Qwen's `<think>`) wrapped in private-use markers before rendering, so tokenization.py can encode them as
plain text while the template's own markup still becomes special tokens. Rows without such literals (nearly
all) are rendered and tokenized unchanged.

Built-in templates: small inline ones (`chatml`, `llama-3`, `mistral`, `alpaca`; each renders `bos_token`,
empty when the tokenizer has none) and the real templates of Qwen2.5, Qwen3, Llama-3.1, Gemma-3 and Mistral
v0.3, shipped under `distsft/assets/chat_templates` (provenance in its README).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.data.formats import Example, RowRejected
from distsft.data.report import DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TEMPLATE_DIR = ASSETS / "chat_templates"

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral v1 (HF): the system prompt joins the first user turn; user/assistant must alternate.
    "mistral": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('mistral template: user and assistant turns must alternate') }}{% endif %}"
        "{% if message['role'] == 'user' %}{% if loop.first and system %}"
        "{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% set loop_messages = messages[1:] %}{% else %}"
        "{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n' }}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{% if not loop.first %}{{ '\n\n' }}{% endif %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}

SHIPPED_TEMPLATES: dict[str, str] = {
    "qwen2.5": "qwen2.5.jinja", "qwen3": "qwen3.jinja", "llama-3.1": "llama-3.1.jinja",
    "gemma-3": "gemma-3.jinja", "mistral-v0.3": "mistral-v0.3.jinja",
}
"""The real chat templates of these model families, as their tokenizers ship them."""

TEMPLATE_NAMES = (*BUILTIN_TEMPLATES, *SHIPPED_TEMPLATES)

# Private-use characters (plane 16), removed from data strings before rendering so only we write them.
MARK_OPEN, MARK_CLOSE = "\U0010fff0", "\U0010fff1"  # around a control-token literal of the data
SENT_OPEN, SENT_CLOSE = "\U0010fff2", "\U0010fff3"  # around one content, to find where the template writes it
PRIVATE = (MARK_OPEN, MARK_CLOSE, SENT_OPEN, SENT_CLOSE)
_PRIVATE_RE = re.compile("[" + "".join(PRIVATE) + "]")


def template_source(name: str) -> str:
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    return (TEMPLATE_DIR / SHIPPED_TEMPLATES[name]).read_text(encoding="utf-8")


def resolve_template(name: str, tokenizer) -> tuple[str, str]:
    """`data.chat_template` -> (label, Jinja source). `auto` is the tokenizer's own, else chatml."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates: use the default one
        own = own.get("default")
    if name in ("auto", "tokenizer"):
        if own:
            return "tokenizer", own
        if name == "tokenizer":
            raise DataError(
                "data.chat_template: the tokenizer has no chat template; choose a built-in one "
                f"({', '.join(TEMPLATE_NAMES)}) or give a .jinja file"
            )
        return "chatml", BUILTIN_TEMPLATES["chatml"]
    if name in TEMPLATE_NAMES:
        return name, template_source(name)
    if name.endswith(".jinja"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise DataError(f"data.chat_template: no such file {p}")
        return str(p), p.read_text(encoding="utf-8")
    return "custom", name


def control_tokens(tokenizer, template: str) -> tuple[str, ...]:
    """The token strings that only the template may produce: special added tokens, and added tokens the
    template's source writes (Qwen's `<think>`, `<tool_call>`), except whitespace tokens. Longest first, so
    a token wins over the tokens it contains."""
    out: set[str] = set()
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        content = str(getattr(tok, "content", tok))
        if content and not content.isspace() and (getattr(tok, "special", True) or content in template):
            out.add(content)
    for s in getattr(tokenizer, "all_special_tokens", []):
        if s and not str(s).isspace():
            out.add(str(s))
    return tuple(sorted(out, key=lambda s: (-len(s), s)))


def control_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def marked_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """A marked literal: exactly one control token between the two markers. A template's string operations
    can separate a marker from its partner (Qwen3 splits content at `</think>`); requiring a control token
    in between keeps a lone marker from pairing up across the template's own markup."""
    inner = "|".join(map(re.escape, tokens)) or "(?!)"
    return re.compile(f"{MARK_OPEN}({inner}){MARK_CLOSE}")


def split_inline_reasoning(msg: dict[str, Any]) -> dict[str, Any]:
    """An assistant message whose content holds `<think>...</think>` (and no reasoning_content), with the
    reasoning moved to `reasoning_content`, split exactly the way Qwen3's template splits it. Done for
    templates that read `reasoning_content`, before control-token literals are marked, so the markers do
    not stop the template's `strip('\\n')` from removing the newlines around the tags."""
    content = msg.get("content") or ""
    if msg["role"] != "assistant" or "reasoning_content" in msg or "</think>" not in content:
        return msg
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return {**msg, "content": content.split("</think>")[-1].lstrip("\n"), "reasoning_content": reasoning}


def mark_controls(obj: Any, pattern: re.Pattern | None) -> tuple[Any, bool]:
    """`obj` (strings, dicts, lists) with our private characters removed from every string and each
    control-token literal wrapped in MARK_OPEN/MARK_CLOSE; and whether any literal was found. Dict keys are
    left alone (they are field names, not text the template writes)."""
    found = False

    def walk(x: Any) -> Any:
        nonlocal found
        if isinstance(x, str):
            if _PRIVATE_RE.search(x):
                x = _PRIVATE_RE.sub("", x)
            if pattern is not None and pattern.search(x):
                found = True
                x = pattern.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, x)
            return x
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    return walk(obj), found


def unmark(text: str) -> str:
    return _PRIVATE_RE.sub("", text) if _PRIVATE_RE.search(text) else text


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix (binary search over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:len(a) - lo] == b[len(b) - mid:len(b) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tail_at(added: str, full: str, pos: int) -> int | None:
    """The smallest k such that `full` holds `added[k:]` at `pos` (None if no non-empty tail fits)."""
    if full.startswith(added, pos):
        return 0
    probe = full[pos:pos + 8]
    if not probe:
        return None
    k = added.find(probe, 1)
    while k >= 0:
        if full.startswith(added[k:], pos):
            return k
        k = added.find(probe, k + 1)
    # the tail may be shorter than the probe
    for k in range(max(1, len(added) - len(probe)), len(added)):
        if full.startswith(added[k:], pos):
            return k
    return None


@dataclass
class Rendered:
    text: str
    """The rendered conversation (with MARK_OPEN/MARK_CLOSE around control-token literals of the data)."""
    spans: list[tuple[int, int]]
    """[start, end) in `text` of each trained assistant turn: the reply and the template's end-of-turn."""
    turns: list[int]
    """The message index of each span."""
    marked: bool
    """Whether `text` holds marked literals."""
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    """What was rendered (the marked copies), to render variations of it (truncation locates a prompt)."""


@dataclass
class _Turn:
    """What one assistant turn must show in its span (the pieces a verification looks for)."""

    answer: str
    reasoning: str
    tool_names: list[str]

    @classmethod
    def of(cls, msg: dict[str, Any]) -> _Turn:
        content = unmark(msg.get("content") or "")
        reasoning = unmark(msg.get("reasoning_content") or "").strip()
        if "</think>" in content:  # inline reasoning, the way Qwen3/DeepSeek exports write it
            inline, content = content.split("</think>", 1)
            reasoning = reasoning or inline.split("<think>")[-1].strip()
        names = [unmark(c["function"]["name"]) for c in msg.get("tool_calls", [])]
        return cls(content.strip(), reasoning, names)


class ChatRenderer:
    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self.control = control_tokens(tokenizer, template)
        self.control_re = control_pattern(self.control)
        self.marked_re = marked_pattern(self.control)
        self.reads_reasoning = "reasoning_content" in template

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _try(self, messages, tools, gen: bool = False) -> str | None:
        try:
            return self.render(messages, tools, gen)
        except Exception:  # a template's raise_exception or a Jinja error on a partial conversation
            return None

    def layout(self, ex: Example) -> Rendered:
        """Render `ex` and find the span of every trained assistant turn; raise `RowRejected` when a span
        cannot be placed or verified (the reason says which turn and why)."""
        messages, tools, marked = ex.messages, ex.tools, False
        if self.reads_reasoning:
            messages = [split_inline_reasoning(m) for m in messages]
        if self.control_re is not None or any(_PRIVATE_RE.search(m.get("content") or "") for m in messages):
            (messages, tools), marked = mark_controls((messages, tools), self.control_re)
        try:
            full = self.render(messages, tools)
        except Exception as e:  # a template's raise_exception, or a Jinja error on this conversation
            raise RowRejected("template_error", _one_line(e)) from None
        self._check_rendered(messages, tools, unmark(full))
        spans: list[tuple[int, int]] = []
        turns: list[int] = []
        for i, trained in enumerate(ex.trained):
            if not trained:
                continue
            a, b = self._turn_span(messages, tools, i, full)
            if spans and a < spans[-1][1]:
                raise RowRejected("template_error", f"assistant turn {i} overlaps the turn before it in the "
                                                    "rendered conversation")
            spans.append((a, b))
            turns.append(i)
        return Rendered(full, spans, turns, marked, messages, tools)

    def _check_rendered(self, messages, tools, text: str) -> None:
        """Prompts, tool results and tool schemas the template leaves out are a rejection: the model would
        be trained on replies to something it never saw."""
        for t in tools or ():
            fn = t.get("function", t)
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str) and unmark(name) not in text:
                raise RowRejected("template_unsupported", f"the chat template ignores `tools` (tool {name!r:.40} "
                                                          "is not in the rendered conversation)")
        for j, m in enumerate(messages):
            c = unmark(m.get("content") or "").strip()
            if m["role"] == "tool" and json.dumps(c, ensure_ascii=False)[1:-1] in text:
                continue  # Llama-3.1 writes tool results through `tojson`
            if m["role"] != "assistant" and c and c not in text:
                what = "tool results" if m["role"] == "tool" else f"the {m['role']} message"
                raise RowRejected("template_unsupported", f"the chat template leaves out {what} (message {j})")

    def _turn_span(self, messages, tools, i: int, full: str) -> tuple[int, int]:
        try:
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1], tools)
        except Exception as e:
            raise RowRejected("template_error", f"assistant turn {i}: {_one_line(e)}") from None
        before = self._try(messages[:i], tools, gen=True) if i > 0 else None
        a = None
        if before is not None:
            a = len(before) if upto.startswith(before) else _common_prefix(before, upto)
        if a is not None and full.startswith(upto):  # A: the prefix renders are prefixes of the document
            span = (a, len(upto))
        elif a is not None and full.startswith(upto[:a]):  # B (i): the turn starts where it would
            k = _tail_at(upto[a:], full, a)
            if k is None:
                raise RowRejected("template_rewrites_history", f"assistant turn {i}: the chat template renders "
                                  "this reply differently once later turns follow, and none of it could be placed")
            span = (a, len(upto) - k)
        else:  # B (ii): the text before the turn changed; find the content where the template writes it
            span = self._located_span(messages, tools, i, full, upto, a)
        self._verify(messages[i], i, unmark(full[span[0]:span[1]]), unmark(upto[a or 0:]))
        return span

    def _locate(self, messages, tools, j: int, text: str) -> tuple[int, int] | None:
        """[start, end) of message j's content in `text` (a render of `messages`): render again with that
        content between sentinels; the two renders differ exactly there (None when they differ elsewhere
        too, i.e. the template reacts to the content, or renders it twice)."""
        content = messages[j].get("content") or ""
        if not content:
            return None
        alt = list(messages)
        alt[j] = {**messages[j], "content": SENT_OPEN + content + SENT_CLOSE}
        other = self._try(alt, tools)
        if other is None:
            return None
        p = _common_prefix(text, other)
        s = _common_suffix(text, other, min(len(text), len(other)) - p)
        region = other[p:len(other) - s]
        if not (region.startswith(SENT_OPEN) and region.endswith(SENT_CLOSE)
                and region.count(SENT_OPEN) == 1 and region.count(SENT_CLOSE) == 1):
            return None
        return p, len(text) - s

    def _located_span(self, messages, tools, i, full, upto, a) -> tuple[int, int]:
        where = self._locate(messages, tools, i, full)
        here = self._locate(messages[: i + 1], tools, i, upto)
        if where is None or here is None or full[where[0]:where[1]] != upto[here[0]:here[1]]:
            raise RowRejected("template_rewrites_history", f"assistant turn {i}: the chat template renders the "
                              "conversation around this reply differently once later turns follow, and the reply "
                              "could not be placed in the full conversation")
        (cs, ce), (us, ue) = where, here
        pre = upto[a:us] if a is not None and us >= a else ""  # what the turn writes before its content
        post = upto[ue:]                                       # ... and after it: tool calls, end-of-turn
        if not full.startswith(post, ce):
            raise RowRejected("template_rewrites_history", f"assistant turn {i}: the chat template ends this "
                              "reply differently once later turns follow")
        start = cs - len(pre) if pre and full[cs - len(pre):cs] == pre else cs
        return start, ce + len(post)

    @staticmethod
    def _verify(msg: dict[str, Any], i: int, span: str, added: str) -> None:
        """The span must hold the reply, its reasoning and its tool calls, as the model writes them."""
        turn = _Turn.of(msg)
        pieces = [("reasoning", turn.reasoning, "its reasoning (reasoning_content or <think>)")]
        pieces += [("tool call", n, f"its tool call {n!r:.40}") for n in turn.tool_names]
        pieces += [("reply", turn.answer, "the reply text")]
        for kind, piece, what in pieces:
            if not piece or piece in span:
                continue
            if piece in added:  # rendered when the turn is last, gone once later turns follow
                detail = f"assistant turn {i}: the chat template leaves out {what} once later turns follow"
                if kind == "reasoning":
                    detail += (" (like Qwen3's, it keeps <think> reasoning only after the last user message); "
                               "end a row at each reasoning turn, or drop the reasoning of earlier turns")
                raise RowRejected("template_rewrites_history", detail)
            if kind == "reply":
                raise RowRejected("template_error", f"assistant turn {i}: the rendered turn does not contain "
                                                    "the reply text as given")
            raise RowRejected("template_unsupported", f"assistant turn {i}: the chat template does not render "
                              f"{what}" + (" (`tool_calls`)" if kind == "tool call" else ""))
