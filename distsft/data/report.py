"""What the data pipeline read, kept, rejected and built: one `SourceReport` per file or dataset, one
`DataReport` for the run. Both are plain data (JSON round-trip) so the main process can cache them and
every rank can reload the same numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad or unusable training data: the message names the file (and the row where there is one)."""


@dataclass
class Rejection:
    """One bad row: `row` is the 0-based index of the row in `file` (for JSONL: the 0-based line)."""

    file: str
    row: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}: {self.detail}"


@dataclass
class SourceReport:
    name: str
    """The path, hub id or `memory:` handle as configured."""
    format: str = "auto"
    role: str = "train"
    """`train` or `eval` (a separate eval file)."""
    rows_read: int = 0
    accepted: int = 0
    """Documents kept after validation and the length policy."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rows that failed validation, by reason."""
    rejected_examples: list[Rejection] = field(default_factory=list)
    """The first `data.log_rejections` rejections in full."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Valid rows dropped later: `too_long`, `no_trainable_tokens`."""
    truncated: int = 0
    """Rows kept with their prompt cut from the left (`length_policy: truncate_prompt`)."""
    tokens: int = 0
    target_tokens: int = 0
    """Tokens in the loss (next-token targets inside a document)."""
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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceReport:
        d = dict(d)
        d["rejected_examples"] = [Rejection(**r) for r in d.get("rejected_examples", [])]
        return cls(**d)

    def line(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        drop = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"{self.name} [{self.format}, {self.role}]: {self.rows_read} rows read, {self.accepted} kept; "
            f"rejected {self.num_rejected} ({rej}); dropped {self.num_dropped} ({drop}); "
            f"prompt truncated {self.truncated}; {self.tokens} tokens ({self.target_tokens} in the loss); "
            f"cache {self.cache}"
        )


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    target_tokens: int = 0
    samples: int = 0
    """Packed slots (or documents when packing is off)."""
    slot_tokens: int = 0
    """`samples * max_seq_len` when packing; the sum of document lengths otherwise."""
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
    def packing_efficiency(self) -> float:
        """Real tokens / slot tokens of the training set."""
        return self.train.packing_efficiency

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
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
            unit = f"slots of {self.max_seq_len}" if self.packing else "samples (one document each)"
            lines.append(
                f"  {name}: {st.documents} documents, {st.tokens} tokens ({st.target_tokens} in the loss) "
                f"in {st.samples} {unit}; packing efficiency {100 * st.packing_efficiency:.2f}%"
            )
        return "\n".join(lines)
