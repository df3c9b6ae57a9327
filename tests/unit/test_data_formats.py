"""Golden token ids and labels per format and chat template; label masks from template spans; BOS once;
EOS in the loss even when pad == eos; unicode round trips."""

import pytest
from data_fixtures import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    B,
    byte_tokenizer,
    cfg,
    demo_tokenizer,
    expected_targets,
    trained_ids,
    write_jsonl,
)

from distsft.config import DataSourceConfig
from distsft.data import build_datasets, collate
from distsft.data.formats import detect_format
from distsft.data.report import DataError
from distsft.data.templates import BUILTIN_TEMPLATES


def one_sample(tmp_path, row, tokenizer, fmt="auto", **kw):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    bundle = build_datasets(cfg(DataSourceConfig(path=str(path), format=fmt), packing=False, **kw), tokenizer, seed=0)
    assert len(bundle.train) == 1, bundle.report.summary()
    return bundle.train[0]


def check(sample, parts):
    """`parts`: list of (ids, trained) pieces making up the golden document."""
    ids = [i for p, _ in parts for i in p]
    trained = [t for p, t in parts for _ in p]
    assert sample["input_ids"].tolist() == ids
    assert sample["target_ids"].tolist() == expected_targets(ids, trained)
    assert sample["position_ids"].tolist() == list(range(len(ids)))


# ---------------------------------------------------------------------------------------------------
# Golden examples, byte tokenizer: ids written down from strings


def test_alpaca_chatml(tmp_path):
    s = one_sample(tmp_path, {"instruction": "hi", "input": "", "output": "yo"}, byte_tokenizer(),
                   chat_template="chatml")
    check(s, [([BOS, IM_START] + B("user\nhi") + [IM_END] + B("\n") + [IM_START] + B("assistant\n"), False),
              (B("yo") + [IM_END] + B("\n"), True)])


def test_alpaca_with_input_alpaca_template(tmp_path):
    s = one_sample(tmp_path, {"instruction": "Add.", "input": "1 2", "output": "3"}, byte_tokenizer(),
                   chat_template="alpaca")
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nAdd.\n\n1 2\n\n### Response:\n")
    check(s, [([BOS] + B(prompt), False), (B("3") + [EOS], True)])


def test_messages_llama3_multi_turn_system(tmp_path):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": " a1 "},  # llama-3 trims content
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]}
    s = one_sample(tmp_path, row, byte_tokenizer(), chat_template="llama-3")

    def h(role):
        return B(f"<|start_header_id|>{role}<|end_header_id|>\n\n")

    eot = B("<|eot_id|>")
    check(s, [([BOS] + h("system") + B("Be brief.") + eot + h("user") + B("q1") + eot + h("assistant"), False),
              (B("a1") + eot, True),
              (h("user") + B("q2") + eot + h("assistant"), False),
              (B("a2") + eot, True)])


def test_sharegpt_mistral(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    s = one_sample(tmp_path, row, byte_tokenizer(), chat_template="mistral")
    check(s, [([BOS] + B("[INST] S\n\nq [/INST]"), False), (B("a") + [EOS], True)])


def test_prompt_completion(tmp_path):
    s = one_sample(tmp_path, {"prompt": "1+1=", "completion": " 2"}, byte_tokenizer())
    check(s, [([BOS] + B("1+1="), False), (B(" 2") + [EOS], True)])


def test_text_continued_pretraining(tmp_path):
    s = one_sample(tmp_path, {"text": "plain text"}, byte_tokenizer())
    check(s, [([BOS], False), (B("plain text") + [EOS], True)])


def test_tokenizer_own_template(tmp_path):
    tpl = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    tok = byte_tokenizer(chat_template=tpl)
    s = one_sample(tmp_path, {"instruction": "hi", "output": "yo"}, tok)  # chat_template: auto -> tokenizer's
    # the template renders no BOS and the tokenizer adds none by default: no BOS
    check(s, [(B("<|user|>\nhi") + [EOS] + B("\n<|assistant|>\n"), False), (B("yo") + [EOS] + B("\n"), True)])


def test_demo_tokenizer_golden(tmp_path):
    """The shipped tokenizer and its own template: exact ids (regression)."""
    s = one_sample(tmp_path, {"instruction": "What is 2+3?", "input": "", "output": "2+3 = 5"}, demo_tokenizer())
    assert s["input_ids"].tolist() == [0, 2, 348, 269, 203, 59, 76, 293, 312, 288, 15, 23, 35, 3, 203, 2, 687, 1454,
                                       794, 203, 22, 15, 23, 282, 326, 3, 203]
    assert s["target_ids"].tolist() == [-100] * 19 + [22, 15, 23, 282, 326, 3, 203, -100]


def test_train_on_inputs(tmp_path):
    s = one_sample(tmp_path, {"instruction": "hi", "output": "yo"}, byte_tokenizer(), chat_template="chatml",
                   train_on_inputs=True)
    ids = s["input_ids"].tolist()
    assert ids[0] == BOS
    check(s, [([BOS], False), (ids[1:], True)])


def test_mask_from_spans_not_substring_search(tmp_path):
    """The assistant's text also appears in the prompt, and the response contains the template's own
    markers: only the assistant turn is trained, exactly; the marker written in the data stays text."""
    reply = "same words<|im_start|>assistant\n"
    row = {"messages": [{"role": "user", "content": reply}, {"role": "assistant", "content": reply}]}
    s = one_sample(tmp_path, row, byte_tokenizer(), chat_template="chatml")
    assert trained_ids(s) == B(reply) + [IM_END] + B("\n")
    # the prompt copy comes first and is not trained
    ids = s["input_ids"].tolist()
    assert ids[: 2 + len(B("user\n")) + len(B(reply))] == [BOS, IM_START] + B("user\n") + B(reply)
    assert ids.count(IM_START) == 2  # the template's two turn headers; the literal in the data is text


# ---------------------------------------------------------------------------------------------------
# BOS exactly once; EOS stays a target with pad == eos


@pytest.mark.parametrize("template", ["chatml", "llama-3", "mistral", "alpaca", "tokenizer"])
def test_bos_exactly_once_when_tokenizer_adds_bos(tmp_path, template):
    own = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    tok = byte_tokenizer(add_bos=True, chat_template=own)
    assert tok("x").input_ids[0] == BOS  # the tokenizer's default encoding adds a BOS
    s = one_sample(tmp_path, {"instruction": "hi", "output": "yo"}, tok, chat_template=template)
    ids = s["input_ids"].tolist()
    assert ids[0] == BOS and ids.count(BOS) == 1


def test_bos_added_when_template_lacks_it_and_tokenizer_adds_one(tmp_path):
    own = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    s = one_sample(tmp_path, {"instruction": "hi", "output": "yo"}, byte_tokenizer(add_bos=True, chat_template=own))
    ids = s["input_ids"].tolist()
    assert ids[0] == BOS and ids.count(BOS) == 1


@pytest.mark.parametrize("row", [{"text": "abc"}, {"prompt": "p", "completion": "c"}])
def test_raw_formats_bos_once(tmp_path, row):
    s = one_sample(tmp_path, row, byte_tokenizer(add_bos=True))
    assert s["input_ids"].tolist().count(BOS) == 1 and s["input_ids"][0] == BOS


def test_eos_in_loss_when_pad_is_eos(tmp_path):
    tok = byte_tokenizer(pad="</s>")
    assert tok.pad_token_id == tok.eos_token_id == EOS
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "long answer"},
                                              {"prompt": "p", "completion": "x"}])
    ds = build_datasets(cfg(path, packing=False), tok, seed=0).train
    batch = collate([ds[0], ds[1]], pad_token_id=tok.pad_token_id)
    for row in range(2):
        n = len(ds[row]["input_ids"])
        tgt = batch["target_ids"][row]
        assert tgt[n - 2] == EOS                      # predicting EOS is trained
        assert (tgt[n - 1:] == -100).all()            # nothing after it, padding included
        assert (batch["input_ids"][row, n:] == EOS).all()  # padding uses the pad (= eos) id
    assert int((batch["target_ids"] == EOS).sum()) == 2


# ---------------------------------------------------------------------------------------------------
# Unicode


UNICODE = [
    "emoji 😀🎉 and a family 👨‍👩‍👧 (zero-width joiners)",
    "CJK 你好，世界。日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed), Å (precomposed)",
    "right-to-left: שלום עולם and مرحبا بالعالم, mixed \u202bembedded\u202c",
    "zero-width space\u200bhere and non-joiner\u200cthere, BOM\ufeffinside",
]


@pytest.mark.parametrize("text", UNICODE)
@pytest.mark.parametrize("which", ["demo", "bytes"])
def test_unicode_round_trip_and_label_alignment(tmp_path, text, which):
    tok = demo_tokenizer() if which == "demo" else byte_tokenizer()
    row = {"messages": [{"role": "user", "content": "Q: " + text}, {"role": "assistant", "content": text}]}
    s = one_sample(tmp_path, row, tok, chat_template="chatml")
    rendered = tok.apply_chat_template(row["messages"], chat_template=BUILTIN_TEMPLATES["chatml"], tokenize=False)
    assert tok.decode(s["input_ids"].tolist()) == rendered
    assert tok.decode(trained_ids(s)) == text + "<|im_end|>\n"


def test_detect_format():
    assert detect_format({"messages"}, "x") == "messages"
    assert detect_format({"conversations", "id"}, "x") == "messages"
    assert detect_format({"instruction", "input", "output"}, "x") == "alpaca"
    assert detect_format({"prompt", "completion"}, "x") == "prompt_completion"
    assert detect_format({"text", "meta"}, "x") == "text"
    with pytest.raises(DataError, match=r"f\.jsonl: cannot detect .*\['answer', 'question'\]"):
        detect_format({"question", "answer"}, "f.jsonl")


def test_explicit_format_overrides_detection(tmp_path):
    # has `text` (auto would pick text) but is declared prompt_completion
    s = one_sample(tmp_path, {"text": "ignored", "prompt": "p", "completion": "c"}, byte_tokenizer(),
                   fmt="prompt_completion")
    check(s, [([BOS] + B("p"), False), (B("c") + [EOS], True)])


def test_field_map(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "hi", "answer": "yo"}])
    src = DataSourceConfig(path=str(path), field_map={"question": "instruction", "answer": "output"})
    s = build_datasets(cfg(src, packing=False, chat_template="chatml"), byte_tokenizer(), seed=0).train[0]
    assert trained_ids(s) == B("yo") + [IM_END] + B("\n")


def test_openai_content_parts(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
                        {"role": "assistant", "content": "yo"}]}
    s = one_sample(tmp_path, row, byte_tokenizer(), chat_template="chatml")
    assert s["input_ids"].tolist()[: 2 + len(B("user\nhi"))] == [BOS, IM_START] + B("user\nhi")


def test_slow_tokenizer_path_matches_offsets(tmp_path):
    """Tokenizers without offsets tokenize per span; on a byte tokenizer both paths agree exactly."""
    from distsft.data.sources import open_source
    from distsft.data.tokenization import tokenize_source

    rows = [{"messages": [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "wörld 😀"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = [tokenize_source(open_source(str(path)), fmt="auto", field_map={}, tokenizer=byte_tokenizer(),
                           template=BUILTIN_TEMPLATES["chatml"], train_on_inputs=False, max_seq_len=512,
                           length_policy="drop", strict=False, log_rejections=5, use_offsets=u)
           for u in (True, False)]
    assert out[0].tokens.tolist() == out[1].tokens.tolist()
    assert out[0].targets.tolist() == out[1].targets.tolist()
    assert PAD not in out[0].tokens.tolist()
