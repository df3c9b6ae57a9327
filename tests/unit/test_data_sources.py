"""Sources: json/jsonl/parquet/csv/arrow files and folders, builtin assets, hub ids (split/subset/revision),
in-memory datasets in place of a path; weighted mixing; eval file or held-out fraction."""

import numpy as np
import pytest
from data_fixtures import byte_tokenizer, cfg, demo_tokenizer, write_json, write_jsonl

from distsft.config import Config, ConfigError, DataConfig, DataSourceConfig
from distsft.data import build_datasets
from distsft.data.report import DataError

ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(12)]


def docs(bundle, ds=None):
    """Sorted token lists of all documents in a dataset (order-free comparison)."""
    ds = ds if ds is not None else bundle.train
    out = []
    for g in range(len(ds.doc_index)):
        out.append(ds.document(g)[0].tolist())
    return sorted(out)


def write_all_formats(d):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "a.jsonl", ROWS)
    write_json(d / "a.json", ROWS)
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, d / "a.parquet")
    with pa.OSFile(str(d / "a.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    import csv

    with open(d / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d / "saved"))


def test_every_file_type_gives_the_same_documents(tmp_path):
    write_all_formats(tmp_path / "f")
    tok = byte_tokenizer()
    ref = docs(build_datasets(cfg(tmp_path / "f" / "a.jsonl"), tok, seed=0))
    assert len(ref) == 12
    for name in ("a.json", "a.parquet", "a.arrow", "a.csv", "saved"):
        assert docs(build_datasets(cfg(tmp_path / "f" / name), tok, seed=0)) == ref, name


def test_folder_reads_all_files(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    write_jsonl(d / "part-0.jsonl", ROWS[:5])
    write_jsonl(d / "part-1.jsonl", ROWS[5:])
    (d / "README.md").write_text("not data")
    b = build_datasets(cfg(d), byte_tokenizer(), seed=0)
    assert b.report.sources[0].rows_read == 12
    assert docs(b) == docs(build_datasets(cfg(write_jsonl(tmp_path / "all.jsonl", ROWS)), byte_tokenizer(), seed=0))


def test_folder_rejections_name_the_file(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    write_jsonl(d / "good.jsonl", ROWS)
    write_jsonl(d / "bad.jsonl", [{"instruction": "q"}])
    src = build_datasets(cfg(d), byte_tokenizer(), seed=0).report.sources[0]
    assert [(r.file.endswith("bad.jsonl"), r.row) for r in src.rejections] == [(True, 0)]


def test_builtin_demo(tmp_path):
    b = build_datasets(DataConfig(cache_dir="none", progress_bar=False), demo_tokenizer(), seed=0)
    assert b.report.sources[0].name == "builtin:gsm8k-demo"
    assert b.report.sources[0].rows_read == 400 and b.report.sources[0].accepted == 400


def test_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="no such builtin dataset"):
        build_datasets(cfg(DataSourceConfig(path="builtin:nope")), byte_tokenizer(), seed=0)


def test_in_memory_dataset_in_place_of_a_path(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")

    ds = datasets.Dataset.from_list(ROWS)
    src = DataSourceConfig(path=ds)
    assert src.path.startswith("memory:")
    b = build_datasets(cfg(src), byte_tokenizer(), seed=0)
    assert docs(b) == docs(build_datasets(cfg(write_jsonl(tmp_path / "a.jsonl", ROWS)), byte_tokenizer(), seed=0))
    # the config stays serialisable
    Config(data=DataConfig(sources=[src])).save(tmp_path / "config.yaml")
    assert "memory:" in (tmp_path / "config.yaml").read_text()


def test_hub_dataset_gets_split_subset_revision(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = DataSourceConfig(path="someorg/somedata", subset="main", split="test", revision="abc123")
    b = build_datasets(cfg(src), byte_tokenizer(), seed=0)
    assert calls == [("someorg/somedata", "main", "test", "abc123")]
    assert b.report.sources[0].accepted == 12


def test_hub_failure_is_one_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")

    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match=r"someorg/x: not a local file .* hub dataset failed .*offline"):
        build_datasets(cfg(DataSourceConfig(path="someorg/x")), byte_tokenizer(), seed=0)


def mixed(tmp_path, sizes, weights, seed=0):
    srcs = []
    for k, (n, w) in enumerate(zip(sizes, weights, strict=True)):
        rows = [{"text": f"source {k} row {i}"} for i in range(n)]
        srcs.append(DataSourceConfig(path=str(write_jsonl(tmp_path / f"s{k}.jsonl", rows)), weight=w))
    return build_datasets(cfg(*srcs, packing=False), byte_tokenizer(), seed=seed)


def test_mixing_by_weight(tmp_path):
    b = mixed(tmp_path, [10, 30], [1, 1])
    assert list(b.report.train.per_source.values()) == [20, 20]  # equal shares of N = 40
    b = mixed(tmp_path, [10, 30], [3, 1])
    assert list(b.report.train.per_source.values()) == [30, 10]
    ds = b.train
    # upsampled source 0 (10 rows -> 30): every row exactly 3 times; source 1: 10 distinct rows of 30
    counts0 = np.bincount(ds.doc_index[ds.doc_source == 0], minlength=10)
    assert counts0.tolist() == [3] * 10
    picked1 = ds.doc_index[ds.doc_source == 1]
    assert len(set(picked1.tolist())) == 10


def test_mixing_is_seeded(tmp_path):
    a = mixed(tmp_path, [10, 30], [1, 1], seed=1).train
    b = mixed(tmp_path, [10, 30], [1, 1], seed=1).train
    c = mixed(tmp_path, [10, 30], [1, 1], seed=2).train
    assert a.doc_index.tolist() == b.doc_index.tolist()
    assert a.doc_index.tolist() != c.doc_index.tolist()


def test_eval_fraction_held_out_disjoint(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(50)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    b = build_datasets(cfg(p, packing=False, eval_fraction=0.2), byte_tokenizer(), seed=0)
    tr, ev = set(b.train.doc_index.tolist()), set(b.eval.doc_index.tolist())
    assert len(ev) == 10 and len(tr) == 40 and not tr & ev
    assert b.report.eval.documents == 10
    b2 = build_datasets(cfg(p, packing=False, eval_fraction=0.2), byte_tokenizer(), seed=0)
    assert set(b2.eval.doc_index.tolist()) == ev


def test_eval_file(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ev = write_jsonl(tmp_path / "eval.jsonl", ROWS[:3])
    b = build_datasets(cfg(tr, eval_path=str(ev)), byte_tokenizer(), seed=0)
    assert b.eval is not None and b.report.eval.documents == 3
    assert [s.role for s in b.report.sources] == ["train", "eval"]
    assert docs(b, b.eval) == docs(build_datasets(cfg(ev), byte_tokenizer(), seed=0))


def test_config_rejects_both_eval_settings():
    with pytest.raises(ConfigError, match="eval_fraction"):
        DataConfig(eval_path="x.jsonl", eval_fraction=0.1)


def test_config_rejects_unknown_template():
    with pytest.raises(ConfigError, match="chat_template"):
        DataConfig(chat_template="vicuna")


def test_custom_jinja_template_file(tmp_path):
    t = tmp_path / "t.jinja"
    t.write_text("{% for m in messages %}{{ m['role'] + ':' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    b = build_datasets(cfg(write_jsonl(tmp_path / "d.jsonl", ROWS[:1]), chat_template=str(t), packing=False),
                       byte_tokenizer(), seed=0)
    assert byte_tokenizer().decode(b.train[0]["input_ids"]) == "user:question 0</s>assistant:answer 0</s>"


def test_report_written_to_output_dir_by_main_process_only(tmp_path):
    import json

    p = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"instruction": "q"}])
    build_datasets(cfg(p), byte_tokenizer(), seed=0, output_dir=str(tmp_path / "rank1"), is_main_process=False)
    assert not (tmp_path / "rank1" / "data_report.json").exists()
    b = build_datasets(cfg(p), byte_tokenizer(), seed=0, output_dir=str(tmp_path / "out"))
    d = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert d["sources"][0]["rows_read"] == 13 and d["sources"][0]["rejected"] == {"missing_field": 1}
    assert d["sources"][0]["rejections"][0]["row"] == 12
    assert d["train"]["packing_efficiency"] == pytest.approx(b.report.packing_efficiency)
    assert "13 rows read, 12 kept" in b.report.summary()
