"""Row formats: detect which one each row uses, validate it, turn it into an `Example`.

    alpaca             {instruction, input?, output, system?}          -> user / assistant messages
    messages           {messages: [{role, content, ...}], tools?}      -> messages (OpenAI form)
                       {conversations: [{from, value}]}  (ShareGPT)    -> messages (human->user, gpt->assistant)
    prompt_completion  {prompt, completion}                            -> raw text, loss on the completion
    text               {text}                                          -> raw text, loss on all of it

Chat messages are handed to the chat template the way transformers' `apply_chat_template` takes them:
roles `system`/`user`/`assistant`/`tool`; an assistant turn may carry `tool_calls` (`[{type, function:
{name, arguments}}]`, `arguments` a dict: an OpenAI-style JSON string is parsed) and `reasoning_content`
(also read from `reasoning`); a `tool` turn may carry `tool_call_id` and `name`; the row's `tools` (JSON
schemas) go to the template's `tools`. Roles are matched case-insensitively ("User", "GPT"); an assistant
turn with `weight: 0` (OpenAI fine-tuning, ShareGPT/axolotl) is rendered but not trained; `tool` turns
(tool results) are never trained.

The format is decided per row when a source's format is `auto`, so a file (or folder) that mixes alpaca and
messages rows keeps both. Validation happens here, before anything is tokenized: a bad row raises
`RowRejected(reason, detail)` with one of the stable `REASONS`, which the caller counts and reports with
the row's index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from distsft.data.report import DataError

FORMATS = ("alpaca", "messages", "prompt_completion", "text")

REASONS = (
    "invalid_json",       # a JSON line that does not parse (or that Python refuses: huge ints, deep nesting)
    "not_an_object",      # a row that is not a JSON object / mapping
    "invalid_text",       # bytes that are not UTF-8, or an unpaired surrogate
    "unknown_format",     # in a source of mixed formats, a row that matches none of them
    "missing_field",
    "wrong_type",
    "null_content",
    "unknown_role",
    "empty_prompt",
    "empty_response",
    "no_assistant_turn",  # no assistant turn, or every one has weight 0
    "empty_text",
    "template_error",     # the chat template raised, or rendered a reply somewhere it cannot be trained
    "template_unsupported",       # the template leaves out tools, tool calls or reasoning the row carries
    "template_rewrites_history",  # the template renders an earlier reply differently (e.g. drops its reasoning)
    "token_alignment",    # a trained span's tokens do not decode to the reply plus the end-of-turn text
    "special_token_text",  # a control-token literal in the data cannot be tokenized as plain text
)

ROLE_MAP = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool",
}
"""Known roles, lower-cased: the OpenAI ones, ShareGPT's, Gemma's `model`, and the names tool results go by."""


class RowRejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Example:
    """A validated row. Chat rows have `messages` (template-ready dicts) with `trained[i]` saying whether
    message i is in the loss, and the row's `tools`; raw rows have `prompt` (not in the loss unless
    `train_on_inputs`) and `response` (in the loss)."""

    messages: list[dict[str, Any]] | None = None
    trained: list[bool] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    prompt: str = ""
    response: str = ""
    format: str = ""


def apply_field_map(row: dict, field_map: dict[str, str]) -> dict:
    if not field_map:
        return row
    return {field_map.get(k, k): v for k, v in row.items()}


def row_format(keys: set[str] | dict) -> str | None:
    """The format a row's keys (after `field_map`) match, or None."""
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def detect_format(keys: set[str], name: str) -> str:
    """The format implied by a source's column names (after `field_map`)."""
    fmt = row_format(keys)
    if fmt is None:
        raise DataError(
            f"{name}: cannot detect the data format from the columns {sorted(keys)}: expected messages or "
            "conversations (chat), instruction+output (alpaca), prompt+completion, or text; set the source's "
            "`format`, or map your column names with `field_map`"
        )
    return fmt


def _check_text(value: str, key: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowRejected(
            "invalid_text", f"{key!r} holds undecodable bytes or an unpaired surrogate at character {e.start}"
        ) from None
    return value


def _check_strings(value: Any, where: str) -> Any:
    """Every string inside `value` (tool schemas, arguments) must be encodable text."""
    if isinstance(value, str):
        return _check_text(value, where)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{where}[{i}]")
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


def _content(value: Any, where: str, *, role: str) -> str:
    if value is None:
        raise RowRejected("null_content", f"{where} content is null")
    if role == "tool" and isinstance(value, (dict, list)) and not _is_text_parts(value):
        # a structured tool result: the JSON text is what the model reads
        return _check_text(json.dumps(value, ensure_ascii=False), f"{where} content")
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


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls -> what chat templates read: `{type, function: {name, arguments: dict}}` (+ `id`)."""
    if not isinstance(value, list):
        raise RowRejected("wrong_type", f"{where} tool_calls is {type(value).__name__}, expected a list")
    out = []
    for k, call in enumerate(value):
        w = f"{where} tool_calls[{k}]"
        if not isinstance(call, dict):
            raise RowRejected("wrong_type", f"{w} is {type(call).__name__}, expected an object")
        fn = call.get("function", call)  # {function: {name, arguments}} or {name, arguments}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowRejected("missing_field", f"{w} has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends the arguments as a JSON string; templates expect a dict
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise RowRejected("wrong_type", f"{w} arguments are not valid JSON: {args!r:.60}") from None
        if not isinstance(args, dict):
            raise RowRejected("wrong_type", f"{w} arguments are {type(args).__name__}, expected a JSON object")
        entry: dict[str, Any] = {"type": call.get("type", "function"),
                                 "function": {"name": _check_text(fn["name"], f"{w} name"),
                                              "arguments": _check_strings(args, f"{w} arguments")}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _weight(turn: dict, where: str) -> bool:
    """OpenAI's `weight` (0 or 1) on an assistant turn; True when absent."""
    if "weight" not in turn or turn["weight"] is None:
        return True
    w = turn["weight"]
    if isinstance(w, bool) or (isinstance(w, (int, float)) and w in (0, 1)):
        return bool(w)
    raise RowRejected("wrong_type", f"{where} weight is {w!r:.20}, expected 0 or 1")


def _messages(row: dict) -> Example:
    key = "messages" if "messages" in row else "conversations"
    if key not in row:
        raise RowRejected("missing_field", f"no 'messages' or 'conversations' field (has {sorted(row)})")
    turns = row[key]
    if turns is None:
        raise RowRejected("null_content", f"{key!r} is null")
    if not isinstance(turns, list) or not turns:
        raise RowRejected("wrong_type", f"{key!r} must be a non-empty list of turns")
    messages: list[dict[str, Any]] = []
    trained: list[bool] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowRejected("wrong_type", f"{where} is {type(turn).__name__}, expected an object")
        role_key = "role" if "role" in turn else "from"
        content_key = "content" if "content" in turn else "value"
        if role_key not in turn:
            raise RowRejected("missing_field", f"{where} has no 'role' (or ShareGPT 'from')")
        role = turn[role_key]
        if not isinstance(role, str):
            raise RowRejected("wrong_type", f"{where} role is {type(role).__name__}, expected a string")
        if role.strip().lower() not in ROLE_MAP:
            raise RowRejected("unknown_role", f"{where} role {role!r:.40} (known: {', '.join(ROLE_MAP)})")
        role = ROLE_MAP[role.strip().lower()]
        msg: dict[str, Any] = {"role": role}
        calls = turn.get("tool_calls")
        if role == "assistant" and calls is not None:
            msg["tool_calls"] = _tool_calls(calls, where)
            if not msg["tool_calls"]:
                del msg["tool_calls"]
        if content_key not in turn and "tool_calls" not in msg:
            raise RowRejected("missing_field", f"{where} has no 'content' (or ShareGPT 'value')")
        raw = turn.get(content_key)
        msg["content"] = "" if raw is None and "tool_calls" in msg else _content(raw, where, role=role)
        if role == "assistant":
            reasoning = turn.get("reasoning_content", turn.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise RowRejected("wrong_type", f"{where} reasoning_content is {type(reasoning).__name__}, "
                                                    "expected a string")
                if reasoning.strip():
                    msg["reasoning_content"] = _check_text(reasoning, f"{where} reasoning_content")
            if not msg["content"].strip() and "tool_calls" not in msg:
                raise RowRejected("empty_response", f"{where} is an empty assistant turn")
        if role == "tool":
            for k in ("tool_call_id", "name"):
                if isinstance(turn.get(k), str):
                    msg[k] = _check_text(turn[k], f"{where} {k}")
        messages.append(msg)
        trained.append(role == "assistant" and _weight(turn, where))
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected("no_assistant_turn", "no assistant turn to train on")
    if not any(trained):
        raise RowRejected("no_assistant_turn", "every assistant turn has weight 0: nothing to train on")
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():  # some exports keep the schemas as a JSON string
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise RowRejected("wrong_type", f"'tools' is a string that is not JSON: {tools!r:.60}") from None
    if tools in (None, "", []):
        tools = None
    elif not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowRejected("wrong_type", "'tools' must be a list of JSON schema objects")
    else:
        _check_strings(tools, "tools")
    return Example(messages=messages, trained=trained, tools=tools, format="messages")


def to_example(row: dict, fmt: str) -> Example:
    """Validate one row (a dict, after `field_map`) of format `fmt`; raise `RowRejected` if it is bad."""
    if fmt == "messages":
        return _messages(row)
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
        return Example(messages=messages, trained=[m["role"] == "assistant" for m in messages], format="alpaca")
    if fmt == "prompt_completion":
        prompt = _field(row, "prompt")
        completion = _field(row, "completion")
        if not completion.strip():
            raise RowRejected("empty_response", "'completion' is empty")
        return Example(prompt=prompt, response=completion, format="prompt_completion")
    if fmt == "text":
        text = _field(row, "text")
        if not text.strip():
            raise RowRejected("empty_text", "'text' is empty")
        return Example(response=text, format="text")
    raise AssertionError(fmt)


def example_for_row(row: dict, fmt: str, default: str) -> Example:
    """`fmt` is the source's configured format; `auto` decides per row from its keys, falling back to the
    source's majority format `default` (so a row missing a field is reported as such, not as unknown)."""
    if fmt == "auto":
        fmt = row_format(row) or default
        if fmt == "unknown":
            raise RowRejected("unknown_format", f"keys {sorted(row)[:12]} match no format (messages/conversations, "
                                                "instruction+output, prompt+completion, text)")
    return to_example(row, fmt)
