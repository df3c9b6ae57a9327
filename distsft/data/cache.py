"""The tokenization cache: one directory per (data content, tokenizer, template, settings, code version).

    <cache_dir>/tokenized/<key>/{tokens,targets,offsets,rows}.npy + report.json

A directory is written under a temporary name and renamed into place, so a reader sees a complete
entry or none; the arrays are memory-mapped on load, so every rank of a node shares one page-cache
copy instead of holding its own. An entry that cannot be read back whole (a truncated array, a damaged
report, arrays that disagree in length) is rebuilt and the new one replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from distsft.data.report import SourceReport
from distsft.data.tokenization import TokenizedSource

logger = logging.getLogger("distsft.data")

CACHE_VERSION = 2
"""Bump when the tokenized output of the same inputs changes (a fix in rendering, masking, ...)."""

_ARRAYS = ("tokens", "targets", "offsets", "rows")


def cache_root(cache_dir: str | None) -> Path | None:
    if cache_dir is not None and cache_dir.lower() in ("none", "off", ""):
        return None
    base = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/distsft/data").expanduser()
    return base / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about the tokenizer that changes token ids: its model, special tokens and class."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "x": tokenizer("x").input_ids}
    h.update(json.dumps([specials, ids], sort_keys=True).encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(path: Path) -> TokenizedSource | None:
    """The entry at `path`, or None when there is none or it is damaged (then `save` replaces it)."""
    if not path.exists():
        return None
    try:
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}
        report = SourceReport.from_dict(json.loads((path / "report.json").read_text()))
        tokens, targets, offsets, rows = (arrays[k] for k in _ARRAYS)
        if not (len(tokens) == len(targets) and len(offsets) == len(rows) + 1
                and (len(offsets) == 0 or int(offsets[-1]) == len(tokens)) and len(rows) == report.accepted):
            raise ValueError("arrays of inconsistent lengths")
    except (OSError, ValueError, TypeError, KeyError, EOFError) as e:
        logger.warning("the tokenization cache entry %s is damaged (%s): rebuilding it", path, e)
        return None
    return TokenizedSource(tokens, targets, offsets, rows, report)


def save(path: Path, ts: TokenizedSource) -> bool:
    """Write `ts` to `path` atomically, replacing a damaged entry there; False (with a warning) when the
    cache cannot be written."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for k in _ARRAYS:
            np.save(tmp / f"{k}.npy", np.ascontiguousarray(getattr(ts, k)))
        report = ts.report.as_dict() | {"cache": "off", "cache_path": None}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            if load(path) is not None:  # a lost race with an identical writer: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return True
            # a damaged entry: move it aside, then put ours in place (each rename is atomic)
            old = path.parent / f".{path.name}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        return True
    except OSError as e:
        logger.warning("could not write the tokenization cache %s (%s); continuing without it", path, e)
        shutil.rmtree(tmp, ignore_errors=True)
        return False
