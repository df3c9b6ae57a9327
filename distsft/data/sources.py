"""Where rows come from: local files and folders, `builtin:` assets, hub datasets, in-memory datasets.

Every source yields `(file, row_index, row)` where `row` is a dict, or a `BadRow` for a row that could not
even be parsed (an invalid JSON line, bytes that are not UTF-8). Nothing here judges the row's content
(validation.py does), and nothing is silently skipped except blank JSONL lines.

Each source also has a content hash, the data half of the tokenization cache key: a SHA-256 of the file
bytes for local data, the `datasets` fingerprint for hub and in-memory datasets (content-derived for
`Dataset.from_dict/from_list/from_pandas` and for hub datasets at a given revision).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.data.report import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", ".arrow")
ASSETS = Path(__file__).resolve().parent.parent / "assets"

_MEMORY: dict[str, Any] = {}


@dataclass
class BadRow:
    """A row that could not be parsed; validation turns it into a rejection."""

    reason: str
    detail: str


def register_dataset(dataset: Any) -> str:
    """Keep an in-memory `datasets.Dataset` in this process and return the `memory:` handle that stands
    for it in `DataSourceConfig.path` (each rank registers its own copy of the same dataset)."""
    fingerprint = getattr(dataset, "_fingerprint", None) or f"id{id(dataset):x}"
    handle = f"memory:{fingerprint}"
    _MEMORY[handle] = dataset
    return handle


@dataclass
class RawSource:
    name: str
    """As configured (path, hub id, builtin: or memory: handle)."""
    kind: str
    """`files`, `hub`, `memory` or `saved` (a `save_to_disk` folder)."""
    files: list[Path]
    content_hash: str
    dataset: Any = None
    """The `datasets.Dataset` for hub, memory and saved sources."""

    def __iter__(self) -> Iterator[tuple[str, int, dict | BadRow]]:
        if self.dataset is not None:
            yield from _iter_dataset(self.name, self.dataset)
            return
        for f in self.files:
            label = str(f) if len(self.files) == 1 else f"{self.name}/{f.name}"
            yield from _iter_file(f, label)

    def num_rows_hint(self) -> int | None:
        return len(self.dataset) if self.dataset is not None else None


def open_source(path: str, *, split: str = "train", subset: str | None = None,
                revision: str | None = None) -> RawSource:
    """Resolve a configured path to a `RawSource`; raise `DataError` naming the path when it cannot."""
    if path.startswith("memory:"):
        if path not in _MEMORY:
            raise DataError(f"{path}: no in-memory dataset registered under this handle in this process")
        ds = _MEMORY[path]
        return RawSource(path, "memory", [], "memory:" + path.removeprefix("memory:"), dataset=ds)
    if path.startswith("builtin:"):
        p = ASSETS / path.removeprefix("builtin:")
        if not p.exists():
            known = sorted(d.name for d in ASSETS.iterdir() if d.is_dir())
            raise DataError(f"{path}: no such builtin dataset (known: {', '.join(known)})")
        src = _open_local(p, split)
        src.name = path
        return src
    p = Path(path).expanduser()
    if p.exists():
        return _open_local(p, split)
    if p.suffix in SUPPORTED_SUFFIXES or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or folder")
    return _open_hub(path, split=split, subset=subset, revision=revision)


def _open_local(p: Path, split: str) -> RawSource:
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            return RawSource(str(p), "saved", [], "saved:" + ds._fingerprint, dataset=ds)
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and f.suffix in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"{p}: folder holds no data files ({', '.join(SUPPORTED_SUFFIXES)})")
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0" + _file_sha256(f).encode())
        return RawSource(str(p), "files", files, h.hexdigest())
    if p.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})")
    return RawSource(str(p), "files", [p], _file_sha256(p))


def _open_hub(path: str, *, split: str, subset: str | None, revision: str | None) -> RawSource:
    import datasets

    try:
        ds = datasets.load_dataset(path, subset, split=split, revision=revision)
    except Exception as e:  # any loader failure (network, missing config, ...) becomes one message
        raise DataError(
            f"{path}: not a local file or folder, and loading it as a hub dataset failed "
            f"(subset={subset!r}, split={split!r}, revision={revision!r}): {type(e).__name__}: {e}"
        ) from e
    key = f"hub:{path}:{subset}:{split}:{revision}:{getattr(ds, '_fingerprint', '')}"
    return RawSource(path, "hub", [], hashlib.sha256(key.encode()).hexdigest(), dataset=ds)


def _file_sha256(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------------------
# Readers


def _iter_dataset(name: str, ds: Any) -> Iterator[tuple[str, int, dict | BadRow]]:
    i = 0
    for batch in ds.iter(batch_size=1024):
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for j in range(n):
            yield name, i, {c: batch[c][j] for c in cols}
            i += 1


def _iter_file(f: Path, label: str) -> Iterator[tuple[str, int, dict | BadRow]]:
    suffix = f.suffix
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(f.read_bytes(), label)
    elif suffix == ".json":
        yield from _iter_json(f, label)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(f, label, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield label, i, row
                i += 1
    elif suffix == ".arrow":
        yield from _iter_arrow(f, label)
    else:  # open_source filters suffixes
        raise AssertionError(suffix)


def _iter_jsonl(data: bytes, label: str) -> Iterator[tuple[str, int, dict | BadRow]]:
    # row index = 0-based line number (blank lines are not rows but keep the numbering honest)
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield label, i, BadRow("invalid_text", f"line {i + 1} is not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield label, i, BadRow("invalid_json", f"line {i + 1}: {e.msg} at column {e.colno}")
            continue
        yield label, i, obj if isinstance(obj, dict) else BadRow("not_an_object", f"got {type(obj).__name__}")


def _iter_json(f: Path, label: str) -> Iterator[tuple[str, int, dict | BadRow]]:
    data = f.read_bytes()
    # surrogateescape keeps bad bytes as lone surrogates: validation rejects exactly the rows holding them
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and e.msg == "Extra data":  # JSON lines in a .json file
            yield from _iter_jsonl(data, label)
            return
        raise DataError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        "a JSON file must hold a list of objects (or use .jsonl, one object per line)") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{f}: a JSON object at the top level must hold exactly one list of rows")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{f}: expected a JSON list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        yield label, i, row if isinstance(row, dict) else BadRow("not_an_object", f"got {type(row).__name__}")


def _iter_csv(f: Path, label: str, delimiter: str) -> Iterator[tuple[str, int, dict | BadRow]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(f, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh, delimiter=delimiter)):
            if None in row:  # more fields than the header names
                yield label, i, BadRow("wrong_type", f"{len(row[None])} more fields than the header has")
                continue
            yield label, i, dict(row)


def _iter_arrow(f: Path, label: str) -> Iterator[tuple[str, int, dict | BadRow]]:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(f)))
        batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        batches = iter(pa.ipc.open_stream(pa.memory_map(str(f))))  # what `datasets` writes
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield label, i, row
            i += 1
