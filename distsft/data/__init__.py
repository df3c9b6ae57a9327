"""The SFT data pipeline: sources -> validated rows -> chat template + label spans -> tokens (cached)
-> length policy -> eval split and weighted mix -> packed slots -> world-size-independent batches.

    bundle = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed, output_dir=cfg.train.output_dir,
                            main_process_first=accelerator.main_process_first,
                            is_main_process=accelerator.is_main_process)
    sampler = GlobalBatchSampler(len(bundle.train), global_batch, seed=..., rank=..., world_size=...,
                                 micro_batch_size=..., shuffle=cfg.data.shuffle, samples_consumed=...)
    loader = DataLoader(bundle.train, batch_sampler=sampler,
                        collate_fn=functools.partial(collate, pad_token_id=tokenizer.pad_token_id))

Every rank makes the same decisions: the main process tokenizes and writes the cache inside
`main_process_first()`, the others then read it; everything after (split, mix, packing plan) is a
deterministic function of the cached arrays and the seed.

Before the first forward, `check_token_ids(bundle, embedding_rows, tokenizer)` refuses data whose token ids
the model's embedding cannot index (a tokenizer that does not match the model), naming the token and row.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distsft.config import DataConfig, DataSourceConfig
from distsft.data import cache
from distsft.data.packing import PackedDataset, collate, pack_best_fit_decreasing
from distsft.data.report import DataError, DataReport, Dropped, Rejection, SourceReport, SplitStats
from distsft.data.sampler import GlobalBatchSampler
from distsft.data.sources import open_source, register_dataset
from distsft.data.templates import BUILTIN_TEMPLATES, resolve_template
from distsft.data.tokenization import TokenizedSource, tokenize_source

__all__ = [
    "BUILTIN_TEMPLATES", "DataBundle", "DataError", "DataReport", "Dropped", "GlobalBatchSampler",
    "PackedDataset", "Rejection", "SourceReport", "build_datasets", "check_token_ids", "collate",
    "load_source", "pack_best_fit_decreasing", "register_dataset",
]

logger = logging.getLogger("distsft.data")


@dataclass
class DataBundle:
    train: PackedDataset
    eval: PackedDataset | None
    report: DataReport


def load_source(spec: DataSourceConfig, cfg: DataConfig, tokenizer, *, role: str = "train",
                template: tuple[str, str] | None = None, is_main_process: bool = True) -> TokenizedSource:
    """One source, tokenized: from the cache when an entry for the same data, tokenizer, template and
    settings exists, else built (and cached)."""
    label, tpl = template or resolve_template(cfg.chat_template, tokenizer)
    if spec.dataset is not None:  # a `datasets.Dataset` given in place of a path: found by its `memory:` handle
        register_dataset(spec.dataset)
    raw = open_source(spec.path, split=spec.split, subset=spec.subset, revision=spec.revision)
    root = cache.cache_root(cfg.cache_dir)
    path = None
    if root is not None:
        key = cache.cache_key({
            "data": raw.content_hash, "format": spec.format, "field_map": spec.field_map,
            "tokenizer": cache.tokenizer_fingerprint(tokenizer), "template": tpl,
            "train_on_inputs": cfg.train_on_inputs, "max_seq_len": cfg.max_seq_len,
            "length_policy": cfg.length_policy,
        })
        path = root / key
        ts = cache.load(path)
        if ts is not None:
            ts.report.name, ts.report.role = spec.path, role
            ts.report.cache, ts.report.cache_path = "hit", str(path)
            if is_main_process:
                logger.info("%s: reusing the tokenization cache %s (%d documents, %d rows rejected)",
                            spec.path, path, len(ts), ts.report.num_rejected)
                for r in ts.report.rejections[: cfg.log_rejections]:
                    logger.warning("rejected %s", r)
            return ts
    ts = tokenize_source(
        raw, fmt=spec.format, field_map=spec.field_map, tokenizer=tokenizer, template=tpl,
        train_on_inputs=cfg.train_on_inputs, max_seq_len=cfg.max_seq_len, length_policy=cfg.length_policy,
        strict=cfg.strict, log_rejections=cfg.log_rejections, num_proc=cfg.num_proc,
        progress=is_main_process and cfg.progress_bar, role=role, log=is_main_process,
    )
    ts.report.name = spec.path
    if path is not None and cache.save(path, ts):
        ts.report.cache, ts.report.cache_path = "miss", str(path)
        if is_main_process:
            logger.info("%s: tokenized %d rows into %d documents; cached at %s",
                        spec.path, ts.report.rows_read, len(ts), path)
    return ts


def _check_usable(ts: TokenizedSource, max_drop_ratio: float) -> None:
    r = ts.report
    what = (f"{r.rows_read} rows read; rejected {r.num_rejected} {r.rejected or ''}; "
            f"dropped {r.num_dropped} {r.dropped or ''}").replace(" ;", ";")
    shown = (r.rejections + r.drops)[:3]
    first = f" First rejections: {'; '.join(map(str, shown))}." if shown else ""
    if len(ts) == 0:
        raise DataError(f"{r.name}: no usable rows ({what}).{first}")
    if r.drop_ratio() > max_drop_ratio:
        raise DataError(
            f"{r.name}: {100 * r.drop_ratio():.1f}% of the rows were rejected or dropped, more than "
            f"data.max_drop_ratio={max_drop_ratio} ({what}).{first} Fix the data (or its format/field_map), "
            "or raise data.max_drop_ratio."
        )


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, *stream])


def _split_and_mix(parts: list[TokenizedSource], weights: list[float], eval_fraction: float, seed: int):
    """Hold out `eval_fraction` of each source (seeded), then mix the rest by weight: source s gives
    round(N * w_s / sum(w)) documents, all of it q times plus a seeded sample without replacement."""
    train_ids, eval_ids = [], []
    for s, ts in enumerate(parts):
        n = len(ts)
        k = min(max(round(n * eval_fraction), 1), n - 1) if eval_fraction > 0 and n >= 2 else 0
        perm = _rng(seed, 0xE7A1, s).permutation(n)
        eval_ids.append(np.sort(perm[:k]))
        train_ids.append(np.sort(perm[k:]))
    total = sum(len(t) for t in train_ids)
    picks = []
    for s, tr in enumerate(train_ids):
        target = total if len(parts) == 1 else round(total * weights[s] / sum(weights))
        q, r = divmod(target, len(tr))
        extra = np.sort(_rng(seed, 0x313C, s).choice(tr, size=r, replace=False))
        picks.append(np.concatenate([np.tile(tr, q), extra]).astype(np.int64))
    return picks, eval_ids


def _table(picks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    src = np.concatenate([np.full(len(p), s, dtype=np.int64) for s, p in enumerate(picks)])
    return src, np.concatenate(picks) if picks else np.zeros(0, np.int64)


def _stats(ds: PackedDataset, names: list[str]) -> SplitStats:
    per_source = {}
    for s, name in enumerate(names):
        c = int((ds.doc_source == s).sum())
        if c:
            per_source[name] = per_source.get(name, 0) + c
    return SplitStats(documents=len(ds.doc_index), tokens=ds.num_tokens, target_tokens=ds.num_target_tokens,
                      sequences=len(ds), slot_tokens=ds.slot_tokens, per_source=per_source)


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int, output_dir: str | None = None,
                   main_process_first=contextlib.nullcontext, is_main_process: bool = True) -> DataBundle:
    """Build the training (and eval) datasets of `cfg` for `tokenizer`; see the module docstring."""
    template = resolve_template(cfg.chat_template, tokenizer)
    specs = [(s, "train") for s in cfg.sources]
    if cfg.eval_path:
        first = cfg.sources[0]
        specs.append((DataSourceConfig(path=cfg.eval_path, format=first.format, field_map=first.field_map), "eval"))
    loaded: list[TokenizedSource] = []
    error: BaseException | None = None
    with main_process_first():
        try:
            for spec, role in specs:
                loaded.append(load_source(spec, cfg, tokenizer, role=role, template=template,
                                          is_main_process=is_main_process))
        except Exception as e:  # leave the context first so the other ranks are released, then raise
            error = e
    if error is not None:
        raise error
    for ts in loaded:
        _check_usable(ts, cfg.max_drop_ratio)

    train_parts = [ts for ts, (_, role) in zip(loaded, specs, strict=True) if role == "train"]
    names = [spec.path for spec in cfg.sources]
    picks, held_out = _split_and_mix(train_parts, [s.weight for s in cfg.sources], cfg.eval_fraction, seed)
    train = PackedDataset(train_parts, *_table(picks), max_seq_len=cfg.max_seq_len, packing=cfg.packing)
    eval_ds = None
    if cfg.eval_path:
        ev = loaded[-1]
        eval_ds = PackedDataset([ev], np.zeros(len(ev), np.int64), np.arange(len(ev)),
                                max_seq_len=cfg.max_seq_len, packing=cfg.packing)
        eval_names = [cfg.eval_path]
    elif cfg.eval_fraction > 0:
        eval_ds = PackedDataset(train_parts, *_table(held_out), max_seq_len=cfg.max_seq_len, packing=cfg.packing)
        eval_names = names
    report = DataReport(
        sources=[ts.report for ts in loaded], chat_template=template[0], max_seq_len=cfg.max_seq_len,
        packing=cfg.packing, train=_stats(train, names),
        eval=_stats(eval_ds, eval_names) if eval_ds is not None else None,
    )
    if is_main_process:
        logger.info("%s", report.summary())
        if output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "data_report.json").write_text(json.dumps(report.as_dict(), indent=1))
    return DataBundle(train=train, eval=eval_ds, report=report)


def check_token_ids(bundle: DataBundle, embedding_rows: int, tokenizer) -> None:
    """Raise `DataError` when a token id of the data (or the pad id) is >= `embedding_rows`, the model's
    input embedding size: the tokenizer does not match the model, and the first forward would fail with an
    IndexError on CPU or a device-side assert on a GPU. Names the token, its source and row.

    Call it after `build_datasets` and the model are built, before the first forward:
    `check_token_ids(data, model.causal_lm.get_input_embeddings().num_embeddings, tokenizer)`."""
    hint = (f"the tokenizer ({len(tokenizer)} tokens) does not match the model's embedding ({embedding_rows} "
            "rows): use the model's own tokenizer, or resize the embeddings to the tokenizer")
    parts = list(bundle.train.sources) + (list(bundle.eval.sources) if bundle.eval is not None else [])
    for ts in parts:
        if 0 <= ts.report.max_token_id < embedding_rows or len(ts.tokens) == 0:
            continue  # the maximum is recorded at tokenization: nothing to scan
        bad = np.flatnonzero(np.asarray(ts.tokens) >= embedding_rows)
        if len(bad) == 0:
            continue
        i = int(bad[0])
        doc = int(np.searchsorted(ts.offsets, i, side="right")) - 1
        tok = int(ts.tokens[i])
        raise DataError(f"{ts.report.name} row {int(ts.rows[doc])}: token id {tok} "
                        f"({tokenizer.convert_ids_to_tokens(tok)!r}) >= {embedding_rows}: {hint}")
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= embedding_rows:  # padding goes through the embedding too
        raise DataError(f"the pad token {tokenizer.pad_token!r} has id {pad} >= {embedding_rows}: {hint}")
