"""Length policy: drop (default), truncate_prompt (from the left, BOS kept, response never cut), raise;
rows with no trainable token dropped; everything counted."""

import pytest
from data_fixtures import BOS, EOS, B, byte_tokenizer, cfg, trained_ids, write_jsonl

from distsft.data import build_datasets
from distsft.data.report import DataError

SHORT = {"prompt": "p", "completion": "ok"}           # BOS + 1 + 2 + EOS = 5 tokens
LONG_PROMPT = {"prompt": "0123456789" * 3, "completion": "answer"}  # 1 + 30 + 6 + 1 = 38 tokens
LONG_RESPONSE = {"prompt": "p", "completion": "r" * 40}             # response alone > 32


def build(tmp_path, rows, **kw):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kw.setdefault("max_drop_ratio", 1.0)
    return build_datasets(cfg(path, packing=False, max_seq_len=32, **kw), byte_tokenizer(), seed=0)


def test_drop_is_default_and_counted(tmp_path):
    b = build(tmp_path, [SHORT, LONG_PROMPT, LONG_RESPONSE, SHORT])
    r = b.report.sources[0]
    assert (r.rows_read, r.accepted, r.dropped) == (4, 2, {"too_long": 2})
    assert all(len(b.train[i]["input_ids"]) <= 32 for i in range(len(b.train)))


def test_exactly_max_seq_len_is_kept(tmp_path):
    row = {"prompt": "", "completion": "x" * 30}  # BOS + 30 + EOS = 32
    b = build(tmp_path, [row])
    assert len(b.train[0]["input_ids"]) == 32 and b.report.sources[0].dropped == {}


def test_raise_names_file_and_row(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl row 1 \(line 2\): too_long: 38 tokens > data\.max_seq_len=32"):
        build(tmp_path, [SHORT, LONG_PROMPT], length_policy="raise")


def test_truncate_prompt_cuts_from_the_left_keeps_bos_and_response(tmp_path):
    b = build(tmp_path, [LONG_PROMPT, LONG_RESPONSE], length_policy="truncate_prompt")
    r = b.report.sources[0]
    assert r.truncated == 1 and r.dropped == {"response_too_long": 1} and r.accepted == 1
    ids = b.train[0]["input_ids"].tolist()
    # 38 -> 32: the 6 oldest prompt tokens after BOS go
    assert ids == [BOS] + B(("0123456789" * 3)[6:]) + B("answer") + [EOS]
    assert trained_ids(b.train[0]) == B("answer") + [EOS]


def test_truncate_prompt_multi_turn_never_cuts_the_last_response(tmp_path):
    """Regression (issue 19): truncate_prompt cut 64 tokens' worth from the left of the whole rendered
    conversation, into the first reply, and still trained that reply's tail right after BOS with no role
    header. Now the first exchange goes whole and the rest is a well-formed conversation."""
    row = {"messages": [{"role": "user", "content": "u" * 20}, {"role": "assistant", "content": "first"},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "last"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    b = build_datasets(cfg(path, packing=False, max_seq_len=64, length_policy="truncate_prompt",
                           chat_template="chatml"), byte_tokenizer(), seed=0)
    ids = b.train[0]["input_ids"].tolist()
    assert byte_tokenizer().decode(ids) == ("<s><|im_start|>user\nagain<|im_end|>\n"
                                            "<|im_start|>assistant\nlast<|im_end|>\n")
    assert byte_tokenizer().decode(trained_ids(b.train[0])) == "last<|im_end|>\n"
    r = b.report.sources[0]
    assert r.truncated == 1 and "dropped the first 1 of 2 exchanges" in r.truncations[0].detail


def test_no_trainable_tokens_dropped(tmp_path):
    """One token, no BOS/EOS: position 0 can never be a target, so the row would train nothing."""
    tok = byte_tokenizer(bos=None, eos=None)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "ab"}])
    b = build_datasets(cfg(path, packing=False, max_drop_ratio=1.0), tok, seed=0)
    r = b.report.sources[0]
    assert r.dropped == {"no_trainable_tokens": 1} and r.accepted == 1
    assert b.train[0]["input_ids"].tolist() == B("ab")
    assert trained_ids(b.train[0]) == B("b")


def _spy_encode(monkeypatch):
    """Record the length of every text the tokenizer is asked to encode."""
    import distsft.data.tokenization as tk

    seen = []
    real = tk.TextEncoder._encode

    def spy(self, text, **kw):
        seen.append(len(text))
        return real(self, text, **kw)

    monkeypatch.setattr(tk.TextEncoder, "_encode", spy)
    return seen


HUGE = "lorem ipsum dolor sit amet " * 150_000  # 4 MB


def test_huge_row_measured_before_tokenization(tmp_path, monkeypatch):
    """Regression (issue 19): a 4 MB row was tokenized whole (1.1 GB and 8 s) before being dropped as too
    long; its length is bounded from its characters first, so it never reaches the tokenizer."""
    seen = _spy_encode(monkeypatch)
    rows = [SHORT, {"prompt": "p", "completion": HUGE}, {"messages": [{"role": "user", "content": HUGE},
                                                                     {"role": "assistant", "content": "a"}]}]
    b = build(tmp_path, rows)
    r = b.report.sources[0]
    assert [(d.row, d.reason) for d in r.drops] == [(1, "too_long"), (2, "too_long")]
    assert "at least" in r.drops[0].detail and max(seen) < 1000


def test_huge_prompt_truncated_without_tokenizing_it_whole(tmp_path, monkeypatch):
    seen = _spy_encode(monkeypatch)
    rows = [{"prompt": HUGE, "completion": "answer"},
            {"messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "answer"}]}]
    b = build(tmp_path, rows, length_policy="truncate_prompt", chat_template="chatml")
    r = b.report.sources[0]
    assert r.accepted == 2 and r.truncated == 2 and max(seen) < 100_000
    for i in range(2):
        assert len(b.train[i]["input_ids"]) == 32 and byte_tokenizer().decode(trained_ids(b.train[i])).startswith(
            "answer")


def test_long_row_measured_on_a_prefix(tmp_path, monkeypatch):
    """Where the character bound is too weak (a vocabulary with very long tokens), a long row is measured
    on a prefix of 16 characters per allowed token before it is tokenized whole."""
    import distsft.data.tokenization as tk

    real_init = tk.TextEncoder.__init__

    def weak_bound(self, *a, **k):
        real_init(self, *a, **k)
        self.max_token_chars = 10**9

    monkeypatch.setattr(tk.TextEncoder, "__init__", weak_bound)
    seen = _spy_encode(monkeypatch)
    rows = [SHORT, {"messages": [{"role": "user", "content": "x" * 100_000}, {"role": "assistant", "content": "a"}]}]
    r = build(tmp_path, rows, chat_template="chatml").report.sources[0]
    assert [(d.row, d.reason) for d in r.drops] == [(1, "too_long")] and max(seen) <= 16 * 32
