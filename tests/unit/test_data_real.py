"""The real data in <repo>/../shared/data with the demo tokenizer at a 2048-token slot; and the inspect
command. Skipped, with the reason, where that folder is absent (a user's clone)."""

import pytest
from data_fixtures import SHARED_DATA, cfg, demo_tokenizer

from distsft.data import build_datasets
from distsft.data.__main__ import main as inspect_main

GSM8K = SHARED_DATA / "gsm8k_train_alpaca.json"
CODE = SHARED_DATA / "code_alpaca_2k.json"
needs_data = pytest.mark.skipif(not (GSM8K.is_file() and CODE.is_file()),
                                reason=f"real data not found at {SHARED_DATA} (<repo>/../shared/data)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("real-cache"))


@needs_data
def test_gsm8k(cache_dir):
    b = build_datasets(cfg(GSM8K, max_seq_len=2048, cache_dir=cache_dir), demo_tokenizer(), seed=0)
    src = b.report.sources[0]
    assert (src.format, src.rows_read, src.accepted, src.num_rejected, src.num_dropped) == ("alpaca", 7473, 7473, 0, 0)
    assert b.report.train.documents == 7473
    assert b.report.packing_efficiency >= 0.95
    assert len(b.train) == b.report.train.sequences
    assert all(len(b.train[i]["input_ids"]) <= 2048 for i in range(0, len(b.train), 50))


@needs_data
def test_code_alpaca(cache_dir):
    b = build_datasets(cfg(CODE, max_seq_len=2048, cache_dir=cache_dir), demo_tokenizer(), seed=0)
    src = b.report.sources[0]
    assert (src.rows_read, src.accepted) == (2017, 2015)
    assert src.rejected == {"empty_response": 2}
    assert [r.row for r in src.rejections] == [237, 1859]
    assert b.report.packing_efficiency >= 0.95


@needs_data
def test_both_mixed_with_eval_split(cache_dir):
    from distsft.config import DataSourceConfig

    srcs = [DataSourceConfig(path=str(GSM8K), weight=3), DataSourceConfig(path=str(CODE), weight=1)]
    b = build_datasets(cfg(*srcs, max_seq_len=2048, cache_dir=cache_dir, eval_fraction=0.02), demo_tokenizer(),
                       seed=0)
    assert all(s.cache == "hit" for s in b.report.sources)  # tokenized by the tests above
    per = list(b.report.train.per_source.values())
    total = 7473 + 2015 - b.report.eval.documents
    assert per == [round(total * 3 / 4), round(total / 4)]
    assert b.report.eval.documents == round(7473 * 0.02) + round(2015 * 0.02)


@needs_data
def test_inspect_command(cache_dir, capsys):
    assert inspect_main(["--data", str(GSM8K), "--max-seq-len", "2048", "--cache-dir", cache_dir]) == 0
    out = capsys.readouterr().out
    assert "rows read: 7473" in out and "rejected: 0" in out and "packing efficiency: 99." in out


def test_inspect_command_on_demo_data(capsys):
    assert inspect_main(["--cache-dir", "none", "--max-seq-len", "1024", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "builtin:gsm8k-demo" in out and "rows read: 400" in out and "===== sample 0:" in out and "[[" in out


def test_inspect_command_reports_unusable_data(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "q", "output": null}\n')
    assert inspect_main(["--data", str(p), "--cache-dir", "none"]) == 1
    assert "bad.jsonl: no usable rows" in capsys.readouterr().err
