"""Tokenize once: the cache is written inside main_process_first by the main process, reused (and logged)
by later runs and other ranks, keyed on content/tokenizer/template/settings; progress bar on main only."""

import contextlib
import logging
import os

import pytest
from data_fixtures import byte_tokenizer, cfg, write_jsonl

import distsft.data as data_mod
from distsft.data import build_datasets
from distsft.data.report import DataError

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]


def samples(bundle):
    return [bundle.train[i]["input_ids"].tolist() for i in range(len(bundle.train))]


@pytest.fixture
def path(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", ROWS)


def test_second_run_reuses_cache_and_logs_it(tmp_path, path, monkeypatch, caplog):
    c = cfg(path, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(c, byte_tokenizer(), seed=0)
    assert first.report.sources[0].cache == "miss"

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setattr(data_mod, "tokenize_source", no_tokenizing)
    with caplog.at_level(logging.INFO, logger="distsft.data"):
        second = build_datasets(c, byte_tokenizer(), seed=0)
    assert second.report.sources[0].cache == "hit"
    assert any("reusing the tokenization cache" in m for m in caplog.messages)
    assert samples(second) == samples(first)
    assert not [p for p in (tmp_path / "cache" / "tokenized").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("change", ["max_seq_len", "chat_template", "train_on_inputs", "length_policy",
                                    "content", "tokenizer", "field_map"])
def test_key_covers_what_changes_tokens(tmp_path, path, change):
    base = dict(cache_dir=str(tmp_path / "cache"))
    build_datasets(cfg(path, **base), byte_tokenizer(), seed=0)
    tok = byte_tokenizer()
    src = path
    kw = dict(base)
    if change == "max_seq_len":
        kw["max_seq_len"] = 256
    elif change == "chat_template":
        kw["chat_template"] = "alpaca"
    elif change == "train_on_inputs":
        kw["train_on_inputs"] = True
    elif change == "length_policy":
        kw["length_policy"] = "truncate_prompt"
    elif change == "content":
        src = write_jsonl(path, ROWS[:-1])
    elif change == "tokenizer":
        tok = byte_tokenizer(add_bos=True)
    elif change == "field_map":
        from distsft.config import DataSourceConfig

        src = DataSourceConfig(path=str(path), field_map={"unused": "x"})
    b = build_datasets(cfg(src, **kw), tok, seed=0)
    assert b.report.sources[0].cache == "miss"


def test_seed_and_packing_do_not_retokenize(tmp_path, path):
    build_datasets(cfg(path, cache_dir=str(tmp_path / "c")), byte_tokenizer(), seed=0)
    b = build_datasets(cfg(path, cache_dir=str(tmp_path / "c"), packing=False, eval_fraction=0.2),
                       byte_tokenizer(), seed=7)
    assert b.report.sources[0].cache == "hit"


def _recording_main_first(events: list):
    """A stand-in for accelerate's `main_process_first` that records when it is entered and left."""

    @contextlib.contextmanager
    def main_first():
        events.append("enter")
        yield
        events.append("exit")

    return main_first


def test_main_process_builds_inside_main_process_first(tmp_path, path, monkeypatch):
    events = []
    main_first = _recording_main_first(events)

    real = data_mod.tokenize_source

    def spy(*a, **k):
        events.append("tokenize")
        return real(*a, **k)

    monkeypatch.setattr(data_mod, "tokenize_source", spy)
    build_datasets(cfg(path, cache_dir=str(tmp_path / "c")), byte_tokenizer(), seed=0, main_process_first=main_first)
    assert events == ["enter", "tokenize", "exit"]
    # another rank, entering after the main process left: reads the cache, tokenizes nothing
    events.clear()
    b = build_datasets(cfg(path, cache_dir=str(tmp_path / "c")), byte_tokenizer(), seed=0,
                       main_process_first=main_first, is_main_process=False)
    assert events == ["enter", "exit"] and b.report.sources[0].cache == "hit"


def test_error_raised_after_leaving_main_process_first(tmp_path, monkeypatch):
    """A failing main process must release the other ranks (leave the context) before it raises."""
    events = []
    main_first = _recording_main_first(events)

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a" * 600}])
    with pytest.raises(DataError):
        build_datasets(cfg(path, length_policy="raise"), byte_tokenizer(), seed=0, main_process_first=main_first)
    assert events == ["enter", "exit"]


def test_progress_bar_main_process_only(tmp_path, path, monkeypatch):
    import tqdm.auto

    seen = []
    real = tqdm.auto.tqdm

    def spy(*a, **k):
        seen.append(k.get("disable"))
        return real(*a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    build_datasets(cfg(path, progress_bar=True), byte_tokenizer(), seed=0, is_main_process=True)
    build_datasets(cfg(path, progress_bar=True), byte_tokenizer(), seed=0, is_main_process=False)
    assert seen == [False, True]


def test_unwritable_cache_dir_warns_and_continues(tmp_path, path, caplog):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions
        ro.chmod(0o700)
        (ro / "tokenized").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="distsft.data"):
        b = build_datasets(cfg(path, cache_dir=str(ro)), byte_tokenizer(), seed=0)
    assert b.report.sources[0].cache == "off" and len(b.train) > 0
    assert any("could not write the tokenization cache" in m for m in caplog.messages)


def test_num_proc_gives_identical_output(tmp_path, monkeypatch):
    import distsft.data.tokenization as tk

    monkeypatch.setattr(tk, "CHUNK_ROWS", 7)  # several chunks, out-of-order completion possible
    monkeypatch.setattr(tk, "MIN_ROWS_PER_WORKER", 1)  # start the workers even for 40 rows ...
    monkeypatch.setattr(tk, "usable_cores", lambda: 3)  # ... and on a machine with no spare core
    rows = [{"instruction": f"question {i} " * (i % 5 + 1), "output": f"answer {i}"} for i in range(40)]
    rows[13] = {"instruction": "q"}
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    one = build_datasets(cfg(p, packing=False), byte_tokenizer(), seed=0)
    two = build_datasets(cfg(p, packing=False, num_proc=2), byte_tokenizer(), seed=0)
    assert samples(one) == samples(two)
    assert one.report.sources[0].rejections == two.report.sources[0].rejections


def test_num_proc_not_used_where_it_cannot_be_faster(monkeypatch):
    """Regression (issue 19): num_proc=2 on 8k rows was slower than one process (each spawned worker imports
    transformers and unpickles the tokenizer; measured 10-11 s against 3.8-8.6 s for 8,000 GSM8K rows on the
    shared 2-core CI machine, and 79 s against 31 s for 40,000). Workers start only where each gets
    MIN_ROWS_PER_WORKER rows and a core of its own besides the main process's."""
    import distsft.data.tokenization as tk
    from distsft.data.sources import RawSource

    def src(n):
        return RawSource("d", "memory", [], "h", dataset=range(n))  # only the row count is read

    monkeypatch.setattr(tk, "usable_cores", lambda: 16)
    assert tk._workers(4, src(8000), 100) == 1
    assert tk._workers(4, src(40_000), 100) == 4
    assert tk._workers(8, src(25_000), 100) == 2
    monkeypatch.setattr(tk, "usable_cores", lambda: 2)
    assert tk._workers(4, src(1_000_000), 100) == 1  # no spare core


def test_damaged_entry_is_rebuilt_and_replaced(tmp_path, path, caplog):
    """Regression (issue 19): a damaged cache entry (here a truncated tokens.npy) was ignored and the data
    re-tokenized on every run, because the new entry could not be renamed over the old one."""
    c = cfg(path, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(c, byte_tokenizer(), seed=0)
    entry = next((tmp_path / "cache" / "tokenized").iterdir())
    tokens = entry / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING, logger="distsft.data"):
        second = build_datasets(c, byte_tokenizer(), seed=0)
    assert second.report.sources[0].cache == "miss"
    assert any("is damaged" in m and "rebuilding" in m for m in caplog.messages)
    third = build_datasets(c, byte_tokenizer(), seed=0)
    assert third.report.sources[0].cache == "hit"
    assert samples(third) == samples(first)
    assert [p.name for p in (tmp_path / "cache" / "tokenized").iterdir()] == [entry.name]  # no leftovers
