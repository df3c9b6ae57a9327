"""What the data pipeline read, kept, rejected and built: one `SourceReport` per file, folder or dataset,
one `DataReport` for the run. Both are plain data (JSON round-trip) so the main process can cache them and
every rank can reload the same numbers.

Numbering, everywhere: `row` is the 0-based index of a row among its file's rows (what `datasets` and
pandas call row i; blank JSONL lines are not rows); `line` is the 1-based line of the file where that row
starts (JSON lines and CSV only), what an editor shows. Messages read "f.jsonl row 9 (line 10)".

Units: a *row* is one record of the source; a kept row becomes one *document* (its tokens); documents are
packed into *sequences* of `max_seq_len` tokens (one document per sequence without packing). A sequence is
what a micro-batch holds one of; the trainer's run summary counts documents as "samples".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad or unusable training data: the message names the file (and the row where there is one)."""


@dataclass
class Rejection:
    """One row left out or changed, and why: `row` is 0-based among the file's rows, `line` the 1-based
    line where it starts (JSON lines, CSV), else None."""

    file: str
    row: int
    reason: str
    detail: str
    line: int | None = None

    def where(self) -> str:
        return f"{self.file} row {self.row}" + (f" (line {self.line})" if self.line is not None else "")

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "line": self.line, "reason": self.reason, "detail": self.detail}


@dataclass
class Dropped(Rejection):
    """A valid row not kept: too long for the length policy, or with nothing to train on. `fatal`: the
    length policy is `raise`, so the run must stop on it."""

    fatal: bool = False


@dataclass
class FileReport:
    path: str
    status: str
    """`read` or `skipped`."""
    reason: str = ""
    """Why a file was skipped (not a data file type, hidden, ...)."""
    rows: int = 0


@dataclass
class SourceReport:
    name: str
    """The path, hub id or `memory:` handle as configured."""
    format: str = "auto"
    """The configured format, or (auto) the one most rows have; `formats` counts rows by format."""
    role: str = "train"
    """`train` or `eval` (a separate eval file)."""
    formats: dict[str, int] = field(default_factory=dict)
    """Documents kept, by the format of their row (a source may mix formats)."""
    files: list[FileReport] = field(default_factory=list)
    """Every file of a local source, read or skipped (with why)."""
    rows_read: int = 0
    accepted: int = 0
    """Documents kept after validation and the length policy (one per kept row)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows that failed validation, by reason."""
    rejections: list[Rejection] = field(default_factory=list)
    """Every rejected row, with its index and reason (the log shows the first `data.log_rejections`)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Valid rows dropped later, by reason: `too_long`, `response_too_long`, `no_trainable_tokens`."""
    drops: list[Rejection] = field(default_factory=list)
    """Every dropped row, with its index and reason."""
    truncated: int = 0
    """Rows kept with prompt tokens or whole earlier turns cut (`length_policy: truncate_prompt`)."""
    truncations: list[Rejection] = field(default_factory=list)
    """Every truncated row, with what was cut."""
    tokens: int = 0
    target_tokens: int = 0
    """Tokens in the loss (next-token targets inside a document)."""
    max_token_id: int = -1
    """The largest token id in the documents (checked against the model's embedding size)."""
    cache: str = "off"
    """`hit` (reused), `miss` (built and written), `off`."""
    cache_path: str | None = None

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def drop_ratio(self) -> float:
        return (self.num_rejected + self.num_dropped) / max(self.rows_read, 1)

    def add_rejection(self, r: Rejection) -> None:
        self.rejected[r.reason] = self.rejected.get(r.reason, 0) + 1
        self.rejections.append(r)

    def add_drop(self, r: Rejection) -> None:
        self.dropped[r.reason] = self.dropped.get(r.reason, 0) + 1
        self.drops.append(r)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("rejections", "drops", "truncations"):
            d[k] = [r.as_dict() for r in getattr(self, k)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceReport:
        d = dict(d)
        for k in ("rejections", "drops", "truncations"):
            d[k] = [Rejection(**r) for r in d.get(k, [])]
        d["files"] = [FileReport(**f) for f in d.get("files", [])]
        return cls(**d)

    def line(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        fmt = self.format
        if len(self.formats) > 1:
            fmt = "mixed: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        return (
            f"{self.name} [{fmt}, {self.role}]: {self.rows_read} rows read, {self.accepted} kept; "
            f"rejected {self.num_rejected} ({rej}); dropped {self.num_dropped} ({drop}); "
            f"truncated {self.truncated}; {self.tokens} tokens ({self.target_tokens} in the loss); "
            f"cache {self.cache}"
        )


@dataclass
class SplitStats:
    documents: int = 0
    """Documents in the split (after weighting: a row drawn twice counts twice); the run summary's "samples"."""
    tokens: int = 0
    target_tokens: int = 0
    sequences: int = 0
    """Packed sequences of `max_seq_len` (one document each when packing is off): `len(dataset)`, the unit
    of `per_device_train_batch_size`."""
    slot_tokens: int = 0
    """`sequences * max_seq_len` when packing; the sum of document lengths otherwise."""
    per_source: dict[str, int] = field(default_factory=dict)
    """Documents taken from each source (after weighting)."""

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.slot_tokens if self.slot_tokens else 0.0


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    chat_template: str = ""
    max_seq_len: int = 0
    packing: bool = True
    train: SplitStats = field(default_factory=SplitStats)
    eval: SplitStats | None = None

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self.sources)

    @property
    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            for k, v in s.rejected.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def dropped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            for k, v in s.dropped.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / slot tokens of the training set."""
        return self.train.packing_efficiency

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sources"] = [s.as_dict() for s in self.sources]
        d["train"]["packing_efficiency"] = self.train.packing_efficiency
        if self.eval is not None:
            d["eval"]["packing_efficiency"] = self.eval.packing_efficiency
        return d

    def summary(self) -> str:
        lines = [
            f"data: {len(self.sources)} source(s), chat template {self.chat_template}, "
            f"max_seq_len {self.max_seq_len}, packing {'on' if self.packing else 'off'}"
        ]
        lines += ["  " + s.line() for s in self.sources]
        for name, st in (("train", self.train), ("eval", self.eval)):
            if st is None:
                lines.append(f"  {name}: none")
                continue
            unit = f"packed sequences of {self.max_seq_len}" if self.packing else "sequences (one document each)"
            lines.append(
                f"  {name}: {st.documents} documents (samples), {st.tokens} tokens ({st.target_tokens} in the "
                f"loss) in {st.sequences} {unit}; packing efficiency {100 * st.packing_efficiency:.2f}%"
            )
        return "\n".join(lines)
