"""Chat templates and the character spans of what is trained on.

A conversation is rendered once in full. The span of assistant turn i is found by rendering prefixes:
`render(messages[:i], add_generation_prompt=True)` ends where the model starts writing, and
`render(messages[:i+1])` ends where its turn (content and end-of-turn token) ends. Those two lengths
are the span, in characters of the full text; tokenization.py maps them to tokens through the
tokenizer's offsets. No token sequence is searched for, so a response that happens to contain the
template's markers, or a tokenizer that merges across a boundary, cannot shift the mask.

Templates that rewrite earlier turns when more are added (so a prefix render is not a prefix of the
full render) fall back to locating the turn's content in the full text, from the end of the previous
span, and extending it over a directly following EOS.

Built-in templates exist for tokenizers that ship none. Each renders `bos_token` (empty when the
tokenizer has none), so a sequence starts with exactly one BOS whenever the tokenizer defines one.
"""

from __future__ import annotations

from pathlib import Path

from distsft.data.formats import RowRejected
from distsft.data.report import DataError

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
                f"({', '.join(BUILTIN_TEMPLATES)}) or give a .jinja file"
            )
        return "chatml", BUILTIN_TEMPLATES["chatml"]
    if name in BUILTIN_TEMPLATES:
        return name, BUILTIN_TEMPLATES[name]
    if name.endswith(".jinja"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise DataError(f"data.chat_template: no such file {p}")
        return str(p), p.read_text(encoding="utf-8")
    return "custom", name


class ChatRenderer:
    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template = template
        self.eos = getattr(tokenizer, "eos_token", None) or ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render_with_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the [start, end) character span of every assistant turn (its content and
        the end-of-turn text the template writes after it)."""
        try:
            full = self.render(messages)
        except Exception as e:  # a template's raise_exception, or a Jinja error on this conversation
            raise RowRejected("template_error", f"{type(e).__name__}: {e}") from None
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            span = self._prefix_span(messages, i, full, cursor) or self._search_span(m["content"], full, cursor)
            if span is None:
                raise RowRejected("template_error", f"assistant turn {i} not found in the rendered template")
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _prefix_span(self, messages, i, full, cursor) -> tuple[int, int] | None:
        try:
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
        except Exception:  # some templates cannot render a partial conversation
            return None
        a, b = len(before), len(upto)
        if a < cursor or not upto.startswith(before) or not full.startswith(upto):
            return None
        if messages[i]["content"].strip() not in full[a:b]:
            return None
        return a, b

    def _search_span(self, content: str, full: str, cursor: int) -> tuple[int, int] | None:
        needle = content.strip()
        a = full.find(needle, cursor)
        if a < 0:
            return None
        b = a + len(needle)
        if self.eos and full.startswith(self.eos, b):
            b += len(self.eos)
        return a, b
