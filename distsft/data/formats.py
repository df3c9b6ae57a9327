"""Row formats: detect which one a source uses, validate each row, turn it into an `Example`.

    alpaca             {instruction, input?, output, system?}          -> user / assistant messages
    messages           {messages: [{role, content}]}  (OpenAI roles)   -> messages
                       {conversations: [{from, value}]}  (ShareGPT)    -> messages (human->user, gpt->assistant)
    prompt_completion  {prompt, completion}                            -> raw text, loss on the completion
    text               {text}                                          -> raw text, loss on all of it

Validation happens here, before anything is tokenized: a bad row raises `RowRejected(reason, detail)`
with one of the stable `REASONS`, which the caller counts and reports with the row's index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distsft.data.report import DataError

FORMATS = ("alpaca", "messages", "prompt_completion", "text")

REASONS = (
    "invalid_json",       # a JSONL line that does not parse
    "not_an_object",      # a row that is not a JSON object / mapping
    "invalid_text",       # bytes that are not UTF-8, or an unpaired surrogate
    "missing_field",
    "wrong_type",
    "null_content",
    "unknown_role",
    "empty_prompt",
    "empty_response",
    "no_assistant_turn",
    "empty_text",
    "template_error",     # the chat template raised or rendered inconsistently
)

ROLE_MAP = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
}


class RowRejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Example:
    """A validated row. Chat rows have `messages` (roles system/user/assistant); raw rows have `prompt`
    (not in the loss unless `train_on_inputs`) and `response` (in the loss)."""

    messages: list[dict[str, str]] | None = None
    prompt: str = ""
    response: str = ""


def apply_field_map(row: dict, field_map: dict[str, str]) -> dict:
    if not field_map:
        return row
    return {field_map.get(k, k): v for k, v in row.items()}


def detect_format(keys: set[str], name: str) -> str:
    """The format implied by a source's column names (after `field_map`)."""
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{name}: cannot detect the data format from the columns {sorted(keys)}: expected messages or "
        "conversations (chat), instruction+output (alpaca), prompt+completion, or text; set the source's "
        "`format`, or map your column names with `field_map`"
    )


def _check_text(value: str, key: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowRejected(
            "invalid_text", f"{key!r} holds undecodable bytes or an unpaired surrogate at character {e.start}"
        ) from None
    return value


def _field(row: dict, key: str, *, optional: bool = False) -> str:
    if key not in row:
        if optional:
            return ""
        raise RowRejected("missing_field", f"no {key!r} field (has {sorted(row)})")
    value = row[key]
    if value is None:
        if optional:
            return ""
        raise RowRejected("null_content", f"{key!r} is null")
    if not isinstance(value, str):
        raise RowRejected("wrong_type", f"{key!r} is {type(value).__name__}, expected a string")
    return _check_text(value, key)


def _content(value: Any, where: str) -> str:
    if value is None:
        raise RowRejected("null_content", f"{where} content is null")
    if isinstance(value, list):  # OpenAI content parts: keep the text parts, refuse anything else
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RowRejected("wrong_type", f"{where} content part {part!r:.60} is not a text part")
            texts.append(part["text"])
        value = "".join(texts)
    if not isinstance(value, str):
        raise RowRejected("wrong_type", f"{where} content is {type(value).__name__}, expected a string")
    return _check_text(value, f"{where} content")


def _messages(row: dict) -> list[dict[str, str]]:
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key)
    if key not in row:
        raise RowRejected("missing_field", f"no 'messages' or 'conversations' field (has {sorted(row)})")
    if turns is None:
        raise RowRejected("null_content", f"{key!r} is null")
    if not isinstance(turns, list) or not turns:
        raise RowRejected("wrong_type", f"{key!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowRejected("wrong_type", f"{where} is {type(turn).__name__}, expected an object")
        role_key = "role" if "role" in turn else "from"
        content_key = "content" if "content" in turn else "value"
        if role_key not in turn:
            raise RowRejected("missing_field", f"{where} has no 'role' (or ShareGPT 'from')")
        if content_key not in turn:
            raise RowRejected("missing_field", f"{where} has no 'content' (or ShareGPT 'value')")
        role = turn[role_key]
        if not isinstance(role, str):
            raise RowRejected("wrong_type", f"{where} role is {type(role).__name__}, expected a string")
        if role not in ROLE_MAP:
            raise RowRejected("unknown_role", f"{where} role {role!r:.40} (known: {', '.join(ROLE_MAP)})")
        role = ROLE_MAP[role]
        content = _content(turn[content_key], where)
        if role == "assistant" and not content.strip():
            raise RowRejected("empty_response", f"{where} is an empty assistant turn")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowRejected("no_assistant_turn", "no assistant turn to train on")
    return out


def to_example(row: dict, fmt: str) -> Example:
    """Validate one row (a dict, after `field_map`) of format `fmt`; raise `RowRejected` if it is bad."""
    if fmt == "messages":
        return Example(messages=_messages(row))
    if fmt == "alpaca":
        instruction = _field(row, "instruction")
        inp = _field(row, "input", optional=True)
        output = _field(row, "output")
        system = _field(row, "system", optional=True)
        if not instruction.strip() and not inp.strip():
            raise RowRejected("empty_prompt", "'instruction' and 'input' are both empty")
        if not output.strip():
            raise RowRejected("empty_response", "'output' is empty")
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Example(messages=messages)
    if fmt == "prompt_completion":
        prompt = _field(row, "prompt")
        completion = _field(row, "completion")
        if not completion.strip():
            raise RowRejected("empty_response", "'completion' is empty")
        return Example(prompt=prompt, response=completion)
    if fmt == "text":
        text = _field(row, "text")
        if not text.strip():
            raise RowRejected("empty_text", "'text' is empty")
        return Example(response=text)
    raise AssertionError(fmt)
