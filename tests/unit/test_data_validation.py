"""Bad rows: each kind rejected before tokenization with its row index and reason; the first few logged
in full and the rest counted; all-bad and mostly-bad files fail naming the file; strict mode stops at the
first; every rank decides the same."""

import json
import logging

import pytest
from data_fixtures import byte_tokenizer, cfg, write_json, write_jsonl

from distsft.config import DataSourceConfig
from distsft.data import build_datasets
from distsft.data.report import DataError

GOOD = {"instruction": "q", "input": "", "output": "a"}


def bad_alpaca_file(path):
    """Line index -> expected reason (None: good)."""
    lines = [
        (json.dumps(GOOD), None),                                              # 0
        ('{"instruction": "q", "output": ', "invalid_json"),                    # 1
        (json.dumps({"instruction": "q"}), "missing_field"),                     # 2
        (json.dumps({"instruction": "q", "output": 3}), "wrong_type"),           # 3
        (json.dumps({"instruction": "q", "output": None}), "null_content"),      # 4
        (json.dumps({"instruction": "q", "output": "  "}), "empty_response"),    # 5
        (json.dumps(["instruction", "output"]), "not_an_object"),               # 6
        (json.dumps(GOOD), None),                                              # 7
        (None, "invalid_text"),                                                # 8: bytes that are not UTF-8
        ('{"instruction": "q", "output": "bad \\ud800 surrogate"}', "invalid_text"),  # 9
        (json.dumps({"instruction": "", "input": "", "output": "a"}), "empty_prompt"),  # 10
        (json.dumps(GOOD), None),                                              # 11
    ]
    data = b""
    for text, _ in lines:
        data += (b'{"instruction": "q", "output": "caf\xe9"}' if text is None else text.encode()) + b"\n"
    path.write_bytes(data)
    return {i: r for i, (_, r) in enumerate(lines) if r is not None}


def test_each_bad_row_reported_with_index_and_reason(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    expected = bad_alpaca_file(path)
    with caplog.at_level(logging.WARNING, logger="distsft.data"):
        report = build_datasets(cfg(path, max_drop_ratio=1.0, log_rejections=100, chat_template="chatml"),
                                byte_tokenizer(), seed=0).report
    src = report.sources[0]
    assert src.rows_read == 12 and src.accepted == 3
    assert {r.row: r.reason for r in src.rejections} == expected
    assert all(r.file == str(path) for r in src.rejections)
    counts = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert src.rejected == counts
    for row, reason in expected.items():
        assert any(f"row {row} (line {row + 1}): {reason}" in m for m in caplog.messages), (row, reason)


def test_bad_messages_rows(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [
        ok,
        {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]},       # unknown_role
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},   # null_content
        {"messages": [{"role": "user", "content": "q"}]},                                          # no_assistant_turn
        {"messages": "q"},                                                                         # wrong_type
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},                    # missing_field
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},     # empty_response
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},      # wrong_type
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},        # ShareGPT: good
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    src = build_datasets(cfg(path, max_drop_ratio=1.0, log_rejections=100, chat_template="chatml"),
                         byte_tokenizer(), seed=0).report.sources[0]
    got = {r.row: r.reason for r in src.rejections}
    assert got == {1: "unknown_role", 2: "null_content", 3: "no_assistant_turn", 4: "wrong_type",
                   5: "missing_field", 6: "empty_response", 7: "wrong_type"}
    assert src.accepted == 2


def test_template_error_is_a_rejection(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "a"}]}]  # mistral needs alternation
    src = build_datasets(cfg(write_jsonl(tmp_path / "m.jsonl", rows), chat_template="mistral"),
                         byte_tokenizer(), seed=0).report.sources[0]
    assert [(r.row, r.reason) for r in src.rejections] == [(1, "template_error")]
    assert "alternate" in src.rejections[0].detail


def test_first_few_logged_all_listed(tmp_path, caplog):
    """Regression (issue 19): only the first `log_rejections` rejected rows were kept in the report; the
    log stays short, but the report (data_report.json) lists every one with its row and line."""
    rows = [GOOD] * 10 + [{"instruction": "q"}] * 7
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="distsft.data"):
        src = build_datasets(cfg(path, log_rejections=2), byte_tokenizer(), seed=0).report.sources[0]
    rejected_lines = [m for m in caplog.messages if m.startswith("rejected ")]
    assert len(rejected_lines) == 2 and "row 10 (line 11): missing_field" in rejected_lines[0]
    assert any("5 more rejected rows not shown" in m for m in caplog.messages)
    assert src.rejected == {"missing_field": 7}
    assert [(r.row, r.line) for r in src.rejections] == [(i, i + 1) for i in range(10, 17)]


def test_only_main_process_logs(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "q"}])
    with caplog.at_level(logging.WARNING, logger="distsft.data"):
        build_datasets(cfg(path), byte_tokenizer(), seed=0, is_main_process=False)
    assert not [m for m in caplog.messages if "rejected" in m]


def test_all_bad_file_fails_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"instruction": "q", "output": None}] * 4)
    with pytest.raises(DataError, match=r"allbad\.jsonl: no usable rows \(4 rows read; rejected 4") as e:
        build_datasets(cfg(path), byte_tokenizer(), seed=0)
    assert "row 0 (line 1): null_content" in str(e.value)


def test_unparsable_file_fails_naming_it(tmp_path):
    path = tmp_path / "garbage.jsonl"
    path.write_text("not json\n{broken\n")
    with pytest.raises(DataError, match=r"garbage\.jsonl: no usable rows .*invalid_json"):
        build_datasets(cfg(path), byte_tokenizer(), seed=0)


def test_empty_file_fails(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable rows \(0 rows read"):
        build_datasets(cfg(path), byte_tokenizer(), seed=0)


def test_mostly_bad_file_fails_over_threshold(tmp_path):
    path = write_jsonl(tmp_path / "mostly.jsonl", [GOOD] * 3 + [{"instruction": "q", "output": None}] * 7)
    with pytest.raises(DataError, match=r"mostly\.jsonl: 70\.0% of the rows .* data\.max_drop_ratio=0\.5"):
        build_datasets(cfg(path), byte_tokenizer(), seed=0)
    # the same data passes under a looser threshold, with everything counted
    r = build_datasets(cfg(path, max_drop_ratio=0.75), byte_tokenizer(), seed=0).report.sources[0]
    assert (r.accepted, r.rejected) == (3, {"null_content": 7})


def test_length_drops_count_toward_drop_ratio(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD] + [{"instruction": "q" * 100, "output": "a"}] * 3)
    with pytest.raises(DataError, match=r"75\.0% .*too_long"):
        build_datasets(cfg(path, max_seq_len=64), byte_tokenizer(), seed=0)


def test_strict_stops_at_first_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad_alpaca_file(path)
    with pytest.raises(DataError, match=r"bad\.jsonl row 1 \(line 2\): invalid_json: .*data\.strict"):
        build_datasets(cfg(path, strict=True, max_drop_ratio=1.0), byte_tokenizer(), seed=0)


def test_broken_json_file_fails_naming_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "q", "output": "a"}, {"instr')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        build_datasets(cfg(path), byte_tokenizer(), seed=0)


def test_json_file_with_bad_bytes_rejects_only_that_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "\xff\xfe"},'
                     b' {"instruction": "q", "output": "b"}]')
    src = build_datasets(cfg(path, max_drop_ratio=1.0), byte_tokenizer(), seed=0).report.sources[0]
    assert [(r.row, r.reason) for r in src.rejections] == [(1, "invalid_text")]
    assert src.accepted == 2


def test_every_rank_decides_the_same(tmp_path):
    """Ranks (main or not, cached or not) keep the same documents in the same order."""
    path = tmp_path / "bad.jsonl"
    bad_alpaca_file(path)

    main = build_datasets(cfg(path, max_drop_ratio=1.0, cache_dir=str(tmp_path / "c")), byte_tokenizer(), seed=3)
    other = build_datasets(cfg(path, max_drop_ratio=1.0, cache_dir=str(tmp_path / "c")), byte_tokenizer(), seed=3,
                           is_main_process=False)
    uncached = build_datasets(cfg(path, max_drop_ratio=1.0), byte_tokenizer(), seed=3, is_main_process=False)
    assert other.report.sources[0].cache == "hit"
    for b in (other, uncached):
        assert len(b.train) == len(main.train)
        for i in range(len(main.train)):
            assert b.train[i]["input_ids"].tolist() == main.train[i]["input_ids"].tolist()
        assert b.report.sources[0].rejected == main.report.sources[0].rejected


def test_wrong_type_rows_in_a_json_list(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD, "just a string", GOOD])
    src = build_datasets(cfg(path, max_drop_ratio=1.0), byte_tokenizer(), seed=0).report.sources[0]
    assert [(r.row, r.reason) for r in src.rejections] == [(1, "not_an_object")]


def test_hub_like_missing_path_is_clear(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        build_datasets(cfg(DataSourceConfig(path=str(tmp_path / "nope.jsonl"))), byte_tokenizer(), seed=0)
