"""The real chat templates of Qwen2.5, Qwen3, Llama-3.1, Gemma-3 and Mistral v0.3 (shipped in
distsft/assets/chat_templates), on tokenizers built offline from the embedded vocabulary plus each family's
special tokens: the decoded label tokens are exactly the assistant replies plus the template's end-of-turn,
in multi-turn rows, with echoed replies, reasoning and tool calls; rows a template cannot train as given
are rejected with the reason."""

import pytest
from data_fixtures import build_one, trained_runs

from distsft.data.templates import SHIPPED_TEMPLATES, TEMPLATE_DIR, template_source
from distsft.data.tiny import FAMILIES, tiny_tokenizer

EOT = {"qwen2.5": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "llama-3.1": "<|eot_id|>", "gemma-3": "<end_of_turn>\n",
       "mistral-v0.3": "</s>"}
LEAD = {"mistral-v0.3": " "}  # Mistral v0.3 writes " " + reply
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3 writes it before a last reply without reasoning


def reply(family, text, *, last=False):
    think = QWEN3_EMPTY_THINK if family == "qwen3" and last else ""
    return LEAD.get(family, "") + think + text + EOT[family]


def build(tmp_path, family, row, **kw):
    kw.setdefault("max_seq_len", 4096)
    return build_one(tmp_path, [row], tiny_tokenizer(family), chat_template=family, **kw)


def runs_of(tmp_path, family, row, **kw):
    b = build(tmp_path, family, row, **kw)
    src = b.report.sources[0]
    assert src.accepted == 1, src.rejections + src.drops
    return trained_runs(b.train[0], tiny_tokenizer(family)), b


def rejection(tmp_path, family, row, **kw):
    src = build_one(tmp_path, [row, GOOD], tiny_tokenizer(family), chat_template=family,
                    max_seq_len=kw.pop("max_seq_len", 4096), **kw).report.sources[0]
    assert [r.row for r in src.rejections] == [0], src.rejections
    return src.rejections[0]


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ECHO = {"messages": [
    {"role": "user", "content": "Reply with exactly: fine thanks"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "Answer Yes or No: is 4 even? Yes"},
    {"role": "assistant", "content": "Yes"},
]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_ROW = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call12345", "content": "sunny, 22C"},
    {"role": "assistant", "content": "It is sunny and 22C in Paris."},
]}


def test_shipped_templates_are_the_files():
    assert sorted(p.name for p in TEMPLATE_DIR.glob("*.jinja")) == sorted(SHIPPED_TEMPLATES.values())
    assert (TEMPLATE_DIR / "README.md").is_file()
    for name in SHIPPED_TEMPLATES:
        assert "messages" in template_source(name)


@pytest.mark.parametrize("family", FAMILIES)
def test_echoed_replies_multi_turn(tmp_path, family):
    """Regression (issue 19): a reply that also occurs earlier in a user turn ("Reply with exactly: fine
    thanks" / "fine thanks", "Answer Yes or No" / "Yes") was located by searching the rendered text and got
    masked onto the user's words under templates that rewrite history (Qwen3), leaving the real reply
    untrained. The labels are exactly the replies plus end-of-turn, at the template's positions."""
    runs, b = runs_of(tmp_path, family, ECHO)
    assert runs == [reply(family, "fine thanks"), reply(family, "Yes", last=True)]
    tok = tiny_tokenizer(family)
    assert tok.decode(b.train[0]["input_ids"].tolist()) == tok.apply_chat_template(ECHO["messages"], tokenize=False)


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama-3.1", "gemma-3"])
def test_system_prompt_kept_and_untrained(tmp_path, family):
    row = {"messages": [{"role": "system", "content": "Be brief."}, *ECHO["messages"]]}
    runs, b = runs_of(tmp_path, family, row)
    assert runs == [reply(family, "fine thanks"), reply(family, "Yes", last=True)]
    assert "Be brief." in tiny_tokenizer(family).decode(b.train[0]["input_ids"].tolist())


def test_mistral_v03_drops_the_system_prompt_is_a_rejection(tmp_path):
    """Mistral v0.3's template writes the system prompt only into a final user turn: a conversation that
    ends with a reply would train without it, so the row is rejected, saying so."""
    r = rejection(tmp_path, "mistral-v0.3", {"messages": [{"role": "system", "content": "Be brief."},
                                                          *ECHO["messages"]]})
    assert r.reason == "template_unsupported" and "leaves out the system message" in r.detail


def test_mistral_v03_moves_tools_to_the_last_user_turn(tmp_path):
    """History rewrite without a common prefix: the tool list moves to the last user turn, so the text
    before the first reply changes once the second exchange follows; the reply is still placed exactly."""
    row = {"tools": TOOLS, "messages": ECHO["messages"]}
    runs, b = runs_of(tmp_path, "mistral-v0.3", row)
    assert runs == [" fine thanks</s>", " Yes</s>"]
    text = tiny_tokenizer("mistral-v0.3").decode(b.train[0]["input_ids"].tolist())
    assert text.index("[AVAILABLE_TOOLS]") > text.index("fine thanks</s>")


# ---------------------------------------------------------------------------------------------------
# reasoning


def test_qwen3_reasoning_of_the_last_turn_is_trained(tmp_path):
    for last in ({"role": "assistant", "content": "Yes", "reasoning_content": "4 = 2 * 2"},
                 {"role": "assistant", "content": "<think>\n4 = 2 * 2\n</think>\n\nYes"},
                 {"role": "assistant", "content": "Yes", "reasoning": "4 = 2 * 2"}):
        runs, _ = runs_of(tmp_path, "qwen3", {"messages": [*ECHO["messages"][:3], last]})
        assert runs == ["fine thanks<|im_end|>\n", "<think>\n4 = 2 * 2\n</think>\n\nYes<|im_end|>\n"]


def test_qwen3_reasoning_of_an_earlier_turn_is_a_clear_rejection(tmp_path):
    """Regression (issue 19): rows whose earlier turns carry reasoning were rejected as "assistant turn 1
    not found", with no word that Qwen3's template drops <think> from earlier turns."""
    for earlier in ({"role": "assistant", "content": "fine thanks", "reasoning_content": "echo it"},
                    {"role": "assistant", "content": "<think>echo it</think>fine thanks"}):
        row = {"messages": [ECHO["messages"][0], earlier, *ECHO["messages"][2:]]}
        r = rejection(tmp_path, "qwen3", row)
        assert r.reason == "template_rewrites_history"
        assert "assistant turn 1" in r.detail and "only after the last user message" in r.detail


@pytest.mark.parametrize("family", ["qwen2.5", "llama-3.1", "gemma-3", "mistral-v0.3"])
def test_reasoning_a_template_cannot_render_is_a_rejection(tmp_path, family):
    row = {"messages": [{"role": "user", "content": "is 4 even?"},
                        {"role": "assistant", "content": "Yes", "reasoning_content": "4 = 2 * 2"}]}
    r = rejection(tmp_path, family, row)
    assert r.reason == "template_unsupported" and "does not render its reasoning" in r.detail


def test_qwen3_multi_step_tool_calls_with_reasoning(tmp_path):
    """After the last user message Qwen3 keeps each turn's reasoning: the tool-call turn trains its
    reasoning and the call, the final turn its reasoning and answer; the tool result is not trained."""
    row = {"tools": TOOLS, "messages": [
        TOOL_ROW["messages"][0],
        {"role": "assistant", "content": "", "reasoning_content": "I need the weather.", "tool_calls": [CALL]},
        TOOL_ROW["messages"][2],
        {"role": "assistant", "content": "Sunny, 22C.", "reasoning_content": "The tool answered."},
    ]}
    runs, _ = runs_of(tmp_path, "qwen3", row)
    assert runs == ['<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                    '{"city": "Paris"}}\n</tool_call><|im_end|>\n',
                    "<think>\nThe tool answered.\n</think>\n\nSunny, 22C.<|im_end|>\n"]


# ---------------------------------------------------------------------------------------------------
# tool calls

CALL_TEXT = {
    "qwen2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
    "llama-3.1": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    "mistral-v0.3": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call12345"}]</s>',
}


@pytest.mark.parametrize("family", CALL_TEXT)
def test_tool_calls_are_trained_tool_results_are_not(tmp_path, family):
    runs, b = runs_of(tmp_path, family, TOOL_ROW)
    assert runs == [CALL_TEXT[family], reply(family, "It is sunny and 22C in Paris.", last=True)]
    text = tiny_tokenizer(family).decode(b.train[0]["input_ids"].tolist())
    assert "sunny, 22C" in text and "get_weather" in text.split(runs[0])[0]  # result and schema in the prompt


def test_gemma_cannot_render_tool_turns(tmp_path):
    r = rejection(tmp_path, "gemma-3", TOOL_ROW)
    assert r.reason == "template_error" and "alternate" in r.detail


def test_llama31_parallel_calls_are_a_rejection(tmp_path):
    two = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    row = {"tools": TOOLS, "messages": [TOOL_ROW["messages"][0],
                                        {"role": "assistant", "content": "", "tool_calls": [CALL, two]},
                                        *TOOL_ROW["messages"][2:]]}
    r = rejection(tmp_path, "llama-3.1", row)
    assert r.reason == "template_error" and "single tool-calls" in r.detail


def test_mistral_tool_call_id_rule_is_a_rejection(tmp_path):
    row = {"tools": TOOLS, "messages": [TOOL_ROW["messages"][0],
                                        {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "c1"}]},
                                        {**TOOL_ROW["messages"][2], "tool_call_id": "c1"}, TOOL_ROW["messages"][3]]}
    r = rejection(tmp_path, "mistral-v0.3", row)
    assert r.reason == "template_error" and "length 9" in r.detail


def test_template_without_tool_support_is_a_rejection(tmp_path):
    tok = tiny_tokenizer("qwen2.5")
    for row, words in ((TOOL_ROW, "ignores `tools`"),
                       ({"messages": TOOL_ROW["messages"]}, "does not render its tool call 'get_weather'")):
        src = build_one(tmp_path, [row, GOOD], tok, chat_template="chatml").report.sources[0]
        assert [(r.row, r.reason) for r in src.rejections] == [(0, "template_unsupported")]
        assert words in src.rejections[0].detail


# ---------------------------------------------------------------------------------------------------
# roles and weights


def test_capitalised_roles_and_weight_zero(tmp_path):
    row = {"messages": [
        {"role": "System", "content": "Be brief."},
        {"role": "USER", "content": "Reply with exactly: fine thanks"},
        {"role": "Assistant", "content": "fine thanks", "weight": 0},
        {"role": "User", "content": "Answer Yes or No: is 4 even? Yes"},
        {"role": "ASSISTANT", "content": "Yes", "weight": 1},
    ]}
    runs, _ = runs_of(tmp_path, "qwen2.5", row)
    assert runs == ["Yes<|im_end|>\n"]
    sharegpt = {"conversations": [{"from": "Human", "value": "hi"}, {"from": "GPT", "value": "a", "weight": 0},
                                  {"from": "human", "value": "again"}, {"from": "gpt", "value": "b"}]}
    runs, _ = runs_of(tmp_path, "llama-3.1", sharegpt)
    assert runs == ["b<|eot_id|>"]


def test_all_weights_zero_and_bad_weight_are_rejections(tmp_path):
    zero = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    assert "weight 0" in rejection(tmp_path, "qwen2.5", zero).detail
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}
    assert rejection(tmp_path, "qwen2.5", bad).reason == "wrong_type"


# ---------------------------------------------------------------------------------------------------
# control-token text in the data stays text


def _control_ids(tok) -> set[int]:
    return set(tok.all_special_ids) | set(tok.added_tokens_decoder)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_text_in_chat_rows_stays_text(tmp_path, family):
    """Regression (issue 19): a literal `<|im_end|>` in a reply was tokenized as EOS and trained
    mid-document, and a literal `<|begin_of_text|>` became a second BOS. Data text is text: the document
    holds exactly the control tokens the template writes for the same conversation without the literals."""
    tok, f = tiny_tokenizer(family), FAMILIES[family]
    literals = [f.eos, *f.special[:3], "<|begin_of_text|>", "<|im_start|>", "<think>", "[INST]", "<tool_call>"]
    text = "see " + " and ".join(literals)
    row = {"messages": [{"role": "user", "content": "Quote " + text},
                        {"role": "assistant", "content": "Sure: " + text}]}
    plain = {"messages": [{"role": "user", "content": "Quote x"}, {"role": "assistant", "content": "Sure: x"}]}
    runs, b = runs_of(tmp_path, family, row)
    assert runs == [reply(family, "Sure: " + text, last=True)]
    ids = b.train[0]["input_ids"].tolist()
    plain_ids = runs_of(tmp_path, family, plain)[1].train[0]["input_ids"].tolist()
    control = _control_ids(tok)
    assert [i for i in ids if i in control] == [i for i in plain_ids if i in control]
    assert tok.decode(ids) == tok.apply_chat_template(row["messages"], tokenize=False)


@pytest.mark.parametrize("row", [{"text": "<|begin_of_text|>Hello<|eot_id|> world <|end_of_text|>"},
                                 {"prompt": "<|begin_of_text|>Q: <|eot_id|>", "completion": " A <|eot_id|>!"}])
def test_special_token_text_in_raw_rows_stays_text(tmp_path, row):
    """The same bug in text and prompt/completion rows: one BOS and one EOS, both from the pipeline."""
    tok = tiny_tokenizer("llama-3.1")
    b = build_one(tmp_path, [row], tok)
    ids = b.train[0]["input_ids"].tolist()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ids[0] == bos and ids.count(bos) == 1 and ids[-1] == eos and ids.count(eos) == 1
    assert not set(ids[1:-1]) & _control_ids(tok)
    prompt, response = row.get("prompt", ""), row.get("completion", row.get("text"))
    assert tok.decode(ids) == "<|begin_of_text|>" + prompt + response + "<|eot_id|>"
    assert trained_runs(b.train[0], tok) == [response + "<|eot_id|>"]


# ---------------------------------------------------------------------------------------------------
# truncate_prompt: whole earlier exchanges, never a reply


SYSTEM = {"role": "system", "content": "You are terse."}


def exchange(k: int) -> list[dict]:
    return [{"role": "user", "content": f"question {k}: " + "pad " * 30},
            {"role": "assistant", "content": f"answer {k}"}]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama-3.1", "gemma-3", "mistral-v0.3"])
def test_truncation_drops_whole_earlier_exchanges(tmp_path, family):
    """Regression (issue 19): truncate_prompt on a multi-turn row cut tokens from the left of the rendered
    conversation, into an earlier reply whose tail was still trained right after BOS with no role header.
    Now the oldest exchanges go whole, the system prompt stays, and the result is the template's own
    rendering of the conversation that is left."""
    system = [] if family == "mistral-v0.3" else [SYSTEM]  # Mistral v0.3 drops it (a rejection, above)
    row = {"messages": [*system, *exchange(1), *exchange(2), *exchange(3)]}
    kept = {"messages": [*system, *exchange(2), *exchange(3)]}
    _, whole = runs_of(tmp_path, family, kept)
    want = whole.train[0]["input_ids"].tolist()
    runs, b = runs_of(tmp_path, family, row, max_seq_len=len(want), length_policy="truncate_prompt")
    assert b.train[0]["input_ids"].tolist() == want
    assert runs == [reply(family, "answer 2"), reply(family, "answer 3", last=True)]
    src = b.report.sources[0]
    assert src.truncated == 1 and "dropped the first 1 of 3 exchanges (2 messages)" in src.truncations[0].detail


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama-3.1", "gemma-3"])
def test_single_turn_truncation_keeps_system_prompt_and_header(tmp_path, family):
    """Regression (issue 19): single-turn truncation removed the system prompt and the chat header (it cut
    from the left of the whole document). Now only the user message's first tokens go."""
    tok = tiny_tokenizer(family)
    words = " ".join(f"w{i}" for i in range(300))
    row = {"messages": [SYSTEM, {"role": "user", "content": "Summarise: " + words},
                        {"role": "assistant", "content": "short"}]}
    _, whole = runs_of(tmp_path, family, row)
    full = tok.decode(whole.train[0]["input_ids"].tolist())
    n = len(whole.train[0]["input_ids"])
    runs, b = runs_of(tmp_path, family, row, max_seq_len=n - 50, length_policy="truncate_prompt")
    ids = b.train[0]["input_ids"].tolist()
    text = tok.decode(ids)
    head, tail = full[: full.index("Summarise")], full[full.index("w299") + len("w299"):]
    assert len(ids) == n - 50 and runs == [reply(family, "short", last=True)]
    assert text.startswith(head) and text.endswith(tail) and "You are terse." in head
    middle = text[len(head): len(text) - len(tail)]
    assert "Summarise" not in middle and (words).endswith(middle) and middle.endswith("w299")


def test_a_reply_is_never_cut(tmp_path):
    long_reply = {"messages": [SYSTEM, {"role": "user", "content": "q"},
                               {"role": "assistant", "content": "word " * 400}]}
    src = build_one(tmp_path, [long_reply, GOOD], tiny_tokenizer("qwen2.5"), chat_template="qwen2.5",
                    max_seq_len=128, length_policy="truncate_prompt").report.sources[0]
    assert [(d.row, d.reason) for d in src.drops] == [(0, "response_too_long")] and src.accepted == 1
