"""Where rows come from: local files and folders, `builtin:` assets, hub datasets, in-memory datasets.

Every source yields `(file, row, line, value)`: `row` is the 0-based index of the row among its file's
rows, `line` the 1-based line where it starts (JSON lines and CSV; None elsewhere), and `value` a dict, or a
`BadRow` for a row that could not even be parsed (invalid JSON, a number Python refuses, nesting too deep,
bytes that are not UTF-8). Nothing here judges the row's content (formats.py does), and nothing is skipped
silently: blank JSON lines are not rows, and a folder's report lists every file read or skipped, and why.

A file that cannot be read at all (corrupt or truncated Parquet/Arrow, a .json that is not JSON, a CSV the
csv module refuses, UTF-16 without a byte-order mark) stops the run with one line naming the file. Text
files are decoded as UTF-8 (a leading BOM is dropped, as Excel's "CSV UTF-8" writes one), or as UTF-16/32
when they start with that byte-order mark. JSON lines and CSV are streamed, never read whole; `.gz`, `.bz2`,
`.xz` (and `.zst` with the `zstandard` package) forms of .jsonl/.json/.csv/.tsv are read, like `datasets`
does; suffixes are matched case-insensitively.

Each source also has a content hash, the data half of the tokenization cache key: a SHA-256 of the file
bytes for local data, the `datasets` fingerprint for hub and in-memory datasets (content-derived for
`Dataset.from_dict/from_list/from_pandas` and for hub datasets at a given revision).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from distsft.config import memory_handle
from distsft.data.report import DataError, FileReport

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".tsv", ".arrow")
COMPRESSED = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
"""The types also read compressed (Parquet and Arrow compress inside the file)."""
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json")
ASSETS = Path(__file__).resolve().parent.parent / "assets"

_MEMORY: dict[str, Any] = {}

Item = tuple[str, int, int | None, Any]


@dataclass
class BadRow:
    """A row that could not be parsed; validation turns it into a rejection."""

    reason: str
    detail: str


def register_dataset(dataset: Any) -> str:
    """Keep an in-memory `datasets.Dataset` in this process and return the `memory:` handle that stands
    for it in `DataSourceConfig.path` (each rank registers its own copy of the same dataset)."""
    handle = memory_handle(dataset)
    _MEMORY[handle] = dataset
    return handle


def _zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def file_kind(path: Path) -> tuple[str, str | None] | None:
    """(data suffix, compression suffix or None) of a file name, case-insensitively; None if not data."""
    name = path.name.lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if comp:
        name = name[: -len(comp)]
    suffix = next((s for s in DATA_SUFFIXES if name.endswith(s)), None)
    return (suffix, comp) if suffix else None


def unreadable_reason(kind: tuple[str, str | None]) -> str | None:
    """Why a data file of this `file_kind` cannot be read here (None: it can)."""
    suffix, comp = kind
    if comp and suffix not in COMPRESSED:
        return f"compressed {suffix} is not read ({suffix} files compress inside; decompress it)"
    if comp == ".zst" and not _zstd_available():
        return "a .zst file needs the `zstandard` package (pip install zstandard)"
    return None


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
    root: Path | None = None
    """The folder, for a folder source."""
    skipped: list[FileReport] = field(default_factory=list)
    rows_per_file: dict[str, int] = field(default_factory=dict)
    """Rows yielded so far, by file label (filled while iterating)."""

    def label(self, f: Path) -> str:
        return str(f) if self.root is None else f"{self.name}/{f.relative_to(self.root)}"

    def __iter__(self) -> Iterator[Item]:
        if self.dataset is not None:
            yield from _iter_dataset(self.name, self.dataset)
            return
        for f in self.files:
            label = self.label(f)
            self.rows_per_file[label] = 0
            for item in _iter_file(f, label):
                self.rows_per_file[label] += 1
                yield item

    def num_rows_hint(self) -> int | None:
        return len(self.dataset) if self.dataset is not None else None

    def file_reports(self) -> list[FileReport]:
        read = [FileReport(self.label(f), "read", rows=self.rows_per_file.get(self.label(f), 0)) for f in self.files]
        return sorted(read + self.skipped, key=lambda r: r.path)


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
            known = sorted(d.name for d in ASSETS.iterdir() if d.is_dir() and any(d.glob("*.jsonl")))
            raise DataError(f"{path}: no such builtin dataset (known: {', '.join(known)})")
        src = _open_local(p, split)
        src.name = path
        return src
    p = Path(path).expanduser()
    if p.exists():
        return _open_local(p, split)
    if file_kind(p) is not None or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file or folder")
    return _open_hub(path, split=split, subset=subset, revision=revision)


def _open_local(p: Path, split: str) -> RawSource:
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            import datasets

            try:
                ds = datasets.load_from_disk(str(p))
            except Exception as e:  # a damaged save_to_disk folder: any loader error becomes one line
                raise DataError(f"{p}: cannot load this save_to_disk folder ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            return RawSource(str(p), "saved", [], "saved:" + ds._fingerprint, dataset=ds)
        files: list[Path] = []
        skipped: list[FileReport] = []
        for f in sorted(p.rglob("*")):
            if not f.is_file():
                continue
            rel = str(f.relative_to(p))
            kind = file_kind(f)
            if any(part.startswith(".") for part in f.relative_to(p).parts):
                skipped.append(FileReport(f"{p}/{rel}", "skipped", "hidden"))
            elif kind is None:
                skipped.append(FileReport(f"{p}/{rel}", "skipped", f"not a data file type ({f.suffix or 'no suffix'})"))
            elif f.name.lower() in METADATA_FILES:
                skipped.append(FileReport(f"{p}/{rel}", "skipped", "dataset metadata"))
            elif (why := unreadable_reason(kind)) is not None:
                skipped.append(FileReport(f"{p}/{rel}", "skipped", why))
            else:
                files.append(f)
        if not files:
            seen = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in skipped[:5]) or "it is empty"
            raise DataError(f"{p}: folder holds no data files to read ({', '.join(DATA_SUFFIXES)}, also "
                            f"compressed .gz/.bz2/.xz/.zst); {seen}")
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0" + _file_sha256(f).encode())
        return RawSource(str(p), "files", files, h.hexdigest(), root=p, skipped=skipped)
    kind = file_kind(p)
    if kind is None:
        raise DataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(DATA_SUFFIXES)}, or their "
                        ".gz/.bz2/.xz/.zst forms)")
    if (why := unreadable_reason(kind)) is not None:
        raise DataError(f"{p}: {why}")
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


def _iter_dataset(name: str, ds: Any) -> Iterator[Item]:
    i = 0
    for batch in ds.iter(batch_size=1024):
        cols = list(batch)
        n = len(batch[cols[0]]) if cols else 0
        for j in range(n):
            yield name, i, None, {c: batch[c][j] for c in cols}
            i += 1


def _opener(f: Path, comp: str | None) -> Callable[[], IO[bytes]]:
    if comp == ".gz":
        return lambda: gzip.open(f, "rb")
    if comp == ".bz2":
        return lambda: bz2.open(f, "rb")
    if comp == ".xz":
        return lambda: lzma.open(f, "rb")
    if comp == ".zst":
        import zstandard

        return lambda: io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f, "rb")))
    return lambda: open(f, "rb")


def _iter_file(f: Path, label: str) -> Iterator[Item]:
    kind = file_kind(f)
    assert kind is not None, f  # open_source filters the file types
    suffix, comp = kind
    opener = _opener(f, comp)
    try:
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(opener, label)
        elif suffix == ".json":
            yield from _iter_json(opener, label)
        elif suffix in (".csv", ".tsv"):
            yield from _iter_csv(opener, label, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            yield from _iter_parquet(f, label)
        else:
            yield from _iter_arrow(f, label)
    except (OSError, EOFError, lzma.LZMAError) as e:  # a truncated or corrupt compressed stream, a read error
        raise DataError(f"{label}: cannot read this file ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def _sniff(head: bytes, label: str) -> str:
    """The text encoding a file's first bytes announce: a BOM, else UTF-8; UTF-16/32 without a BOM is named."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if len(head) >= 4 and ((head[0] and not head[1] and not head[3]) or (not head[0] and head[1] and not head[2])):
        raise DataError(f"{label}: looks like UTF-16 (or UTF-32) text without a byte-order mark; save it as UTF-8")
    return "utf-8"


def _parse_json_line(text: str) -> Any:
    """A parsed row, or a BadRow for a line Python's json refuses."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow("invalid_json", f"{e.msg} at column {e.colno}")
    except RecursionError:
        return BadRow("invalid_json", "nested too deeply for Python's json parser")
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        return BadRow("invalid_json", _first_line(e).split(";")[0])
    return obj if isinstance(obj, dict) else BadRow("not_an_object", f"got {type(obj).__name__}")


def _iter_jsonl(opener: Callable[[], IO[bytes]], label: str) -> Iterator[Item]:
    with opener() as fh:
        enc = _sniff(fh.peek(4)[:4] if hasattr(fh, "peek") else b"", label)
        if enc.startswith("utf-8"):
            lines: Iterator[tuple[int, str | BadRow]] = _utf8_lines(fh, enc == "utf-8-sig")
        else:
            lines = _decoded_lines(fh, enc, label)
        row = 0
        for lineno, text in lines:  # 1-based
            if isinstance(text, str) and not text.strip():
                continue  # blank lines are not rows
            yield label, row, lineno, text if isinstance(text, BadRow) else _parse_json_line(text)
            row += 1


def _utf8_lines(fh: IO[bytes], bom: bool) -> Iterator[tuple[int, str | BadRow]]:
    for lineno, raw in enumerate(fh, start=1):
        if lineno == 1 and bom:
            raw = raw[3:]
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not raw.strip():
                continue
            yield lineno, BadRow("invalid_text", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)")


def _decoded_lines(fh: IO[bytes], enc: str, label: str) -> Iterator[tuple[int, str]]:
    text = io.TextIOWrapper(fh, encoding=enc, newline="")
    lineno = 0
    try:
        for lineno, line in enumerate(text, start=1):  # noqa: B007 (lineno is read in the except)
            yield lineno, line
    except UnicodeDecodeError as e:
        raise DataError(f"{label} line {lineno + 1}: not valid {enc.upper()} ({e.reason})") from None


def _iter_json(opener: Callable[[], IO[bytes]], label: str) -> Iterator[Item]:
    with opener() as fh:
        data = fh.read()  # a JSON document has to be parsed whole
    enc = _sniff(data[:4], label)
    if enc.startswith("utf-8"):
        # surrogateescape keeps bad bytes as lone surrogates: validation rejects exactly the rows holding them
        text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    else:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError as e:
            raise DataError(f"{label}: not valid {enc.upper()} ({e.reason} at byte {e.start})") from None
    del data
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and e.msg == "Extra data":  # JSON lines in a .json file
            row = 0
            for lineno, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    yield label, row, lineno, _parse_json_line(line)
                    row += 1
            return
        raise DataError(f"{label}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        "a JSON file must hold a list of objects (or use .jsonl, one object per line)") from None
    except RecursionError:
        raise DataError(f"{label}: not readable JSON (nested too deeply for Python's json parser)") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise DataError(f"{label}: not readable JSON ({_first_line(e).split(';')[0]})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{label}: a JSON object at the top level must hold exactly one list of rows")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{label}: expected a JSON list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        yield label, i, None, row if isinstance(row, dict) else BadRow("not_an_object", f"got {type(row).__name__}")


def _iter_csv(opener: Callable[[], IO[bytes]], label: str, delimiter: str) -> Iterator[Item]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with opener() as fh:
        enc = _sniff(fh.peek(4)[:4] if hasattr(fh, "peek") else b"", label)
        # utf-8-sig drops the BOM Excel writes (else the first column is named '\ufeffinstruction')
        enc = "utf-8-sig" if enc.startswith("utf-8") else enc
        text = io.TextIOWrapper(fh, encoding=enc, errors="surrogateescape", newline="")
        reader = csv.DictReader(text, delimiter=delimiter)
        i, start = 0, 1
        try:
            for row in reader:
                if None in row:  # more fields than the header names
                    yield label, i, start, BadRow("wrong_type", f"{len(row[None])} more fields than the header has")
                else:
                    yield label, i, start, dict(row)
                i, start = i + 1, reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{label} line {reader.line_num}: not readable CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{label} line {reader.line_num}: not valid {enc.upper()} ({e.reason})") from None


def _arrow_error(label: str, what: str, e: BaseException) -> DataError:
    return DataError(f"{label}: cannot read this {what} file, it may be truncated or corrupt "
                     f"({type(e).__name__}: {_first_line(e)})")


def _iter_parquet(f: Path, label: str) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=1024)
        for batch in batches:
            for row in batch.to_pylist():
                yield label, i, None, row
                i += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _arrow_error(label, "Parquet", e) from None


def _iter_arrow(f: Path, label: str) -> Iterator[Item]:
    import pyarrow as pa

    i = 0
    try:
        source = pa.memory_map(str(f))
        try:
            reader = pa.ipc.open_file(source)
            batches: Iterator = (reader.get_batch(k) for k in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(f))))  # what `datasets` writes
        for batch in batches:
            for row in batch.to_pylist():
                yield label, i, None, row
                i += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _arrow_error(label, "Arrow", e) from None
