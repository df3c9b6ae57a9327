"""Messy inputs: every reader problem is a rejected row or a one-line error naming the file, never a
traceback; folders say which files were read and which were skipped and why; compressed and upper-case
file names are read; formats are decided per row; every rejected and dropped row is listed in
data_report.json with its row (0-based) and line (1-based)."""

import bz2
import gzip
import json
import lzma
import subprocess
import sys

import pytest
from data_fixtures import REPO, byte_tokenizer, cfg, write_json, write_jsonl

from distsft.config import DataSourceConfig
from distsft.data import build_datasets
from distsft.data.__main__ import main as inspect_main
from distsft.data.report import DataError

GOOD = {"instruction": "q", "output": "a"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def build(path, **kw):
    kw.setdefault("max_drop_ratio", 1.0)
    return build_datasets(cfg(path, chat_template="chatml", **kw), byte_tokenizer(), seed=0)


def one_line_error(path, match, **kw):
    with pytest.raises(DataError, match=match) as e:
        build(path, **kw)
    assert "\n" not in str(e.value) and str(path.name) in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------
# JSON lines and JSON


def test_json_lines_python_refuses_are_rejections(tmp_path):
    """Regression (issue 19): a JSON line with a 5,000-digit integer (ValueError, not JSONDecodeError)
    or nested deeper than Python's parser allows (RecursionError) ended the run with a traceback."""
    path = tmp_path / "d.jsonl"
    deep = '{"instruction": "q", "output": ' + "[" * 5000 + "]" * 5000 + "}"
    nested = {"tools": json.loads("[" * 900 + "]" * 900), **CHAT}  # parses, but too deep to walk
    path.write_text("\n".join([json.dumps(GOOD), '{"instruction": "q", "output": ' + "7" * 5000 + "}",
                               deep, json.dumps(nested), json.dumps(GOOD)]) + "\n")
    src = build(path).report.sources[0]
    assert [(r.row, r.line, r.reason) for r in src.rejections] == [
        (1, 2, "invalid_json"), (2, 3, "invalid_json"), (3, 4, "wrong_type")]
    assert "4300 digits" in src.rejections[0].detail and "nested too deeply" in src.rejections[1].detail
    assert src.accepted == 2


def test_json_file_python_refuses_is_one_line_error(tmp_path):
    """Regression (issue 19): the same inputs in a .json file ended the run with a traceback."""
    path = tmp_path / "big.json"
    path.write_text('[{"instruction": "q", "output": ' + "7" * 5000 + "}]")
    one_line_error(path, r"big\.json: not readable JSON \(Exceeds the limit \(4300 digits\)")
    path.write_text("[" * 5000 + "]" * 5000)
    one_line_error(path, r"big\.json: not readable JSON \(nested too deeply")


def test_row_and_line_numbering(tmp_path):
    """Regression (issue 19): a rejection read "row 9" while its detail said "line 10". A row is
    0-based among the rows (blank lines are not rows), a line is 1-based in the file; both are given once."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n{broken\n\n" + json.dumps({"instruction": "q"}))
    src = build(path, log_rejections=10).report.sources[0]
    assert [(r.row, r.line, r.reason) for r in src.rejections] == [(2, 4, "invalid_json"), (3, 6, "missing_field")]
    assert str(src.rejections[0]).endswith("d.jsonl row 2 (line 4): invalid_json: Expecting property name "
                                           "enclosed in double quotes at column 2")


# ---------------------------------------------------------------------------------------------------
# encodings


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_bom_is_dropped(tmp_path, suffix):
    """Regression (issue 19): an Excel "CSV UTF-8" file (and a .json/.jsonl with a BOM) failed on the column
    '\\ufeffinstruction'."""
    path = tmp_path / f"d{suffix}"
    body = {".jsonl": json.dumps(GOOD) + "\n", ".json": json.dumps([GOOD]), ".csv": "instruction,output\nq,a\n"}[suffix]
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    src = build(path).report.sources[0]
    assert (src.accepted, src.format) == (1, "alpaca")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf16_with_bom_is_read(tmp_path, suffix):
    """Regression (issue 19): UTF-16 files (as Windows tools save them) failed to decode with a traceback."""
    path = tmp_path / f"d{suffix}"
    body = {".jsonl": json.dumps(GOOD) + "\r\n" + json.dumps({"instruction": "é", "output": "ü"}) + "\r\n",
            ".json": json.dumps([GOOD, GOOD]), ".csv": "instruction,output\r\nq,a\r\né,ü\r\n"}[suffix]
    path.write_bytes(body.encode("utf-16"))  # with its BOM, as Windows tools write it
    assert build(path).report.sources[0].accepted == 2


def test_utf16_without_bom_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16-le"))
    one_line_error(path, r"d\.jsonl: looks like UTF-16 .* without a byte-order mark; save it as UTF-8")


# ---------------------------------------------------------------------------------------------------
# Parquet, Arrow, compressed


def _table(tmp_path):
    import pyarrow as pa

    return pa.Table.from_pylist([GOOD] * 50)


def test_corrupt_and_truncated_parquet_is_one_line_error(tmp_path):
    """Regression (issue 19): a corrupt or truncated Parquet file ended the run with pyarrow's traceback."""
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(_table(tmp_path), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(path, r"d\.parquet: cannot read this Parquet file, it may be truncated or corrupt")
    path.write_bytes(b"PAR1" + b"\x00garbage" * 20)
    one_line_error(path, r"d\.parquet: cannot read this Parquet file")


def test_corrupt_and_truncated_arrow_is_one_line_error(tmp_path):
    """Regression (issue 19): the same for Arrow files."""
    import pyarrow as pa

    path = tmp_path / "d.arrow"
    table = _table(tmp_path)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(path, r"d\.arrow: cannot read this Arrow file, it may be truncated or corrupt")
    path.write_bytes(b"not arrow at all" * 4)
    one_line_error(path, r"d\.arrow: cannot read this Arrow file")


def test_truncated_gzip_is_one_line_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    data = gzip.compress(("".join(json.dumps(GOOD) + "\n" for _ in range(2000))).encode())
    path.write_bytes(data[: len(data) // 2])
    one_line_error(path, r"d\.jsonl\.gz: cannot read this file \(EOFError")


def test_folder_reports_files_read_and_skipped(tmp_path):
    """Regression (issue 19): a folder's `.JSONL` and `.json.gz` files were skipped silently. The compressed
    forms `datasets` reads are read, suffixes match in any case, and every other file is listed with why."""
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "A.JSONL", [GOOD] * 2)
    (d / "b.json.gz").write_bytes(gzip.compress(json.dumps([GOOD] * 3).encode()))
    (d / "sub" / "c.jsonl.bz2").write_bytes(bz2.compress((json.dumps(GOOD) + "\n").encode()))
    (d / "e.CSV.xz").write_bytes(lzma.compress(b"instruction,output\nq,a\nq,b\n"))
    (d / "README.md").write_text("about")
    (d / ".hidden.jsonl").write_text(json.dumps(GOOD))
    (d / "f.parquet.gz").write_bytes(b"")
    (d / "dataset_info.json").write_text("{}")
    src = build(d).report.sources[0]
    files = {f.path.removeprefix(str(d) + "/"): (f.status, f.rows or f.reason) for f in src.files}
    assert files == {
        "A.JSONL": ("read", 2), "b.json.gz": ("read", 3), "sub/c.jsonl.bz2": ("read", 1), "e.CSV.xz": ("read", 2),
        "README.md": ("skipped", "not a data file type (.md)"), ".hidden.jsonl": ("skipped", "hidden"),
        "f.parquet.gz": ("skipped", "compressed .parquet is not read (.parquet files compress inside; "
                                    "decompress it)"),
        "dataset_info.json": ("skipped", "dataset metadata"),
    }
    assert src.rows_read == src.accepted == 8


def test_folder_without_data_files_names_what_it_saw(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    one_line_error(d, r"empty: folder holds no data files to read .*notes\.txt: not a data file type \(\.txt\)")


# ---------------------------------------------------------------------------------------------------
# formats per row


def test_formats_decided_per_row(tmp_path):
    """Regression (issue 19): the format was detected once per source from its first rows, so a folder of
    alpaca and messages files lost the minority silently, and a 50/50 file lost half."""
    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "alpaca.jsonl", [GOOD] * 10)
    write_jsonl(d / "chat.jsonl", [CHAT] * 3)
    src = build(d).report.sources[0]
    assert (src.accepted, src.formats, src.num_rejected) == (13, {"alpaca": 10, "messages": 3}, 0)
    half = write_jsonl(tmp_path / "half.jsonl", [GOOD, CHAT, {"text": "t"}, {"prompt": "p", "completion": "c"}] * 5)
    src = build(half).report.sources[0]
    assert src.accepted == 20 and src.formats == {"alpaca": 5, "messages": 5, "text": 5, "prompt_completion": 5}
    assert "mixed: alpaca 5, messages 5, prompt_completion 5, text 5" in src.line()


def test_row_of_no_format_in_a_mixed_source_is_reported_against_the_majority(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, CHAT, {"question": "q"}])
    src = build(path).report.sources[0]
    assert [(r.row, r.reason) for r in src.rejections] == [(3, "missing_field")]


# ---------------------------------------------------------------------------------------------------
# the report lists every row left out


def test_data_report_lists_every_rejected_and_dropped_row(tmp_path):
    """Regression (issue 19): data_report.json held only the first 5 rejections per source, and dropped
    rows carried no index."""
    rows = [GOOD] * 4 + [{"instruction": "q"}] * 7 + [{"instruction": "q " * 300, "output": "a"}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    build_datasets(cfg(path, max_seq_len=64, max_drop_ratio=1.0), byte_tokenizer(), seed=0,
                   output_dir=str(tmp_path / "out"))
    src = json.loads((tmp_path / "out" / "data_report.json").read_text())["sources"][0]
    assert [(r["row"], r["line"], r["reason"]) for r in src["rejections"]] == [
        (i, i + 1, "missing_field") for i in range(4, 11)]
    assert [(r["row"], r["line"], r["reason"]) for r in src["drops"]] == [(i, i + 1, "too_long") for i in (11, 12, 13)]
    assert src["rejected"] == {"missing_field": 7} and src["dropped"] == {"too_long": 3}


def test_report_units_say_documents_and_sequences(tmp_path):
    """Regression (issue 19): the run summary's "samples" counted documents while the data report's
    "samples" counted packed sequences. The report says documents (samples) and sequences."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 40)
    r = build(path, max_seq_len=256).report
    assert r.train.documents == 40 and r.train.sequences == len(build(path, max_seq_len=256).train) < 40
    assert "40 documents (samples)" in r.summary() and "packed sequences of 256" in r.summary()
    assert "samples" not in r.as_dict()["train"]


# ---------------------------------------------------------------------------------------------------
# no traceback: every listed input through the inspect command


def _bad_inputs(tmp_path):
    import pyarrow.parquet as pq

    out = {}
    p = tmp_path / "huge.json"
    p.write_text('[{"instruction": "q", "output": ' + "7" * 5000 + "}]")
    out["huge.json"] = p
    p = tmp_path / "deep.json"
    p.write_text("[" * 5000 + "]" * 5000)
    out["deep.json"] = p
    p = tmp_path / "cut.parquet"
    pq.write_table(_table(tmp_path), p)
    p.write_bytes(p.read_bytes()[:100])
    out["cut.parquet"] = p
    p = tmp_path / "le16.csv"
    p.write_bytes("instruction,output\nq,a\n".encode("utf-16-le"))
    out["le16.csv"] = p
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"instruction": "q", "output": "a"}\n' * 3000)[:200])
    out["cut.jsonl.gz"] = p
    return out


def test_every_bad_input_is_one_error_line_not_a_traceback(tmp_path, capsys):
    for name, path in _bad_inputs(tmp_path).items():
        assert inspect_main(["--data", str(path), "--cache-dir", "none"]) == 1, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {path}") and "Traceback" not in err, (name, err)


def test_inspect_command_process_exit(tmp_path):
    """The same through a real `python -m distsft.data` process: exit status 1, one line, no traceback."""
    path = _bad_inputs(tmp_path)["cut.parquet"]
    out = subprocess.run([sys.executable, "-m", "distsft.data", "--data", str(path), "--cache-dir", "none"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {path}: cannot read this Parquet file")


def test_jsonl_in_a_source_config_with_explicit_format_and_bad_rows(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD, {"instruction": 3, "output": "a"}, "row"])
    src = build(DataSourceConfig(path=str(path), format="alpaca")).report.sources[0]
    assert [(r.row, r.line, r.reason) for r in src.rejections] == [(1, None, "wrong_type"), (2, None, "not_an_object")]


def test_json_lines_are_streamed_not_read_whole(tmp_path, monkeypatch):
    """JSON lines (plain or compressed) are read line by line: the first rows arrive before the file ends."""
    from pathlib import Path

    from distsft.data.sources import open_source

    def no_whole_reads(*a, **k):
        raise AssertionError("read whole")

    monkeypatch.setattr(Path, "read_bytes", no_whole_reads)
    monkeypatch.setattr(Path, "read_text", no_whole_reads)
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(GOOD) + "\n" for _ in range(1000))
    with open(path, "ab") as f:
        f.write(b"\x1f\x8b broken tail")  # the end is damaged: the rows before it still stream out
    rows = iter(open_source(str(path)))
    assert next(rows)[1:] == (0, 1, GOOD)
    with pytest.raises(DataError, match=r"d\.jsonl\.gz: cannot read this file"):
        list(rows)


def test_chat_rows_from_parquet(tmp_path):
    """Arrow gives every row every key (None where a row had none): tool rows and plain rows side by side."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    call = {"id": "call12345", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "content": "1", "tool_call_id": "call12345"},
                          {"role": "assistant", "content": "done", "reasoning_content": None, "weight": 1}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    b = build_datasets(cfg(path, packing=False), byte_tokenizer(chat_template=QWEN_LIKE), seed=0)
    assert b.report.sources[0].accepted == 2, b.report.sources[0].rejections


QWEN_LIKE = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') }}"
             "{% for c in m.tool_calls or [] %}{{ 'CALL ' + c.function.name + (c.function.arguments | tojson) }}"
             "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_show_prints_everything(tmp_path, capsys):
    chat = {"messages": [{"role": "user", "content": "Reply with exactly: fine thanks"},
                         {"role": "assistant", "content": "fine thanks"},
                         {"role": "user", "content": "Quote it"},
                         {"role": "assistant", "content": "It is <|im_end|>"}]}
    rows = [chat] * 3 + [{"messages": [{"role": "wizard", "content": "x"}]}, {"prompt": "p", "completion": "w " * 600}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert inspect_main(["--data", str(path), "--tokenizer", "builtin:tiny-qwen3", "--cache-dir", "none",
                         "--show", "1", "--max-seq-len", "256", "--no-packing"]) == 0
    out = capsys.readouterr().out
    assert "d.jsonl row 3 (line 4): unknown_role" in out and "d.jsonl row 4 (line 5): too_long" in out
    assert "<|im_start|>assistant\n[[fine thanks<|im_end|>\n]]" in out
    assert "[[<think>\n\n</think>\n\nIt is <|im_end|><|im_end|>\n]]" in out
    assert "control tokens: <|im_start|> x4, <|im_end|> x4, <think> x1, </think> x1" in out
