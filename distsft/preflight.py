"""Checks that need neither an accelerator nor a model, run before either exists: a typo in a path, a
model directory without a tokenizer, a missing W&B login or an output directory that holds another run
stop the run in seconds, with one line naming the key, instead of after the model has loaded.

    cfg = preflight(cfg)      # every rank (and the `distsft train` launcher), first thing; writes nothing
    prepare_output_dir(cfg)   # the main process, once the run is known to start: mkdir, config.yaml

The output directory guard (as HF `TrainingArguments(overwrite_output_dir)`): a directory holding an
earlier run is refused, naming the flag to replace it (`train.overwrite_output_dir=true`) or to continue it
(`checkpoint.resume_from_checkpoint=auto`). A default output directory (`train.output_dir` unset) never
refuses: the next free `<name>-2`, `<name>-3`, ... is used instead, so the no-argument demo runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from distsft.config import Config, DataConfig, DistributedConfig, ModelConfig

logger = logging.getLogger("distsft")

# What a run writes into its output directory (the overwrite flag removes exactly these).
RUN_FILES = ("config.yaml", "data_report.json", "metrics.jsonl", "summary.json", "training_curves.png")
RUN_DIRS = ("checkpoints", "adapter", "merged", "base", "tensorboard", "wandb")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class PriorRun:
    """What an output directory holds of an earlier run that trained at least one step."""

    path: Path
    finished: bool
    last_step: int | None
    checkpoints: list[Path] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "a finished run" if self.finished else "an unfinished run"
        step = f"step {self.last_step}; " if self.last_step is not None else ""
        return f"{state} ({step}{', '.join(self.entries)})"


def _last_step(metrics: Path) -> int | None:
    """The last optimizer step in a metrics.jsonl (read from its end; a crash may leave a partial line)."""
    with open(metrics, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("step"), int):
            return rec["step"]
    return None


def prior_run(out: Path) -> PriorRun | None:
    """The earlier run in `out`, or None when `out` holds none: absent, empty, or only the files of a start
    that failed before its first step (config.yaml, data_report.json), which a new run may replace."""
    from distsft.checkpoint import committed_checkpoints

    if not out.is_dir():
        return None
    checkpoints = committed_checkpoints(out / "checkpoints")
    summary, adapter, metrics = out / "summary.json", out / "adapter", out / "metrics.jsonl"
    last = None
    if summary.is_file():
        with contextlib.suppress(ValueError):  # a summary cut mid-write: read the metrics instead
            last = json.loads(summary.read_text()).get("final_step")
    if last is None and metrics.is_file():
        last = _last_step(metrics)
    entries = [name + "/" if (out / name).is_dir() else name for name in (*RUN_DIRS, *RUN_FILES)
               if (out / name).exists() and name not in ("config.yaml", "data_report.json")]
    if not (checkpoints or summary.is_file() or adapter.is_dir() or last is not None):
        return None
    return PriorRun(out, finished=summary.is_file() or adapter.is_dir(), last_step=last, checkpoints=checkpoints,
                    entries=entries)


def default_output_dir(model: ModelConfig) -> str:
    """`outputs/demo` for the embedded demo, else `outputs/<the model's name>`."""
    if model.name_or_path is None and model.init_from_config == "builtin:tiny-llama":
        return "outputs/demo"
    source = (model.name_or_path or model.init_from_config or "run").rstrip("/")
    name = Path(source.removeprefix("builtin:")).name
    if name == "config.json":
        name = Path(source).parent.name
    return f"outputs/{name or 'run'}"


def resolve_output_dir(cfg: Config) -> Path:
    """Decide where this run writes, and refuse to clobber an earlier run; sets `cfg.train.output_dir`.
    Writes nothing (every rank decides the same from the same directory state)."""
    t, resume = cfg.train, cfg.checkpoint.resume_from_checkpoint
    if t.overwrite_output_dir and resume is not None:
        raise ValueError("train.overwrite_output_dir: true replaces the run that checkpoint.resume_from_checkpoint="
                         f"{resume} would continue; set one of them")
    explicit = t.output_dir is not None
    out = Path(t.output_dir if explicit else default_output_dir(cfg.model))
    prior = prior_run(out)
    if prior is not None and not t.overwrite_output_dir:
        if resume == "auto" and prior.checkpoints:
            pass  # continue it: the newest committed checkpoint is resumed
        elif resume == "auto" and not prior.finished:
            logger.warning("%s: an unfinished run with no committed checkpoint; starting it again from step 0", out)
        elif resume not in (None, "auto") and Path(resume).resolve().is_relative_to(out.resolve()):
            pass  # an explicit checkpoint of this very run
        elif not explicit and resume is None:
            base, n = out, 2
            while prior_run(out) is not None:
                out, n = base.with_name(f"{base.name}-{n}"), n + 1
            logger.warning("%s holds %s; this run writes to %s (set train.output_dir to choose)", base, prior, out)
        else:
            options = ["set train.overwrite_output_dir=true to replace it"]
            if prior.checkpoints and resume != "auto":
                options.append("checkpoint.resume_from_checkpoint=auto to continue it")
            options.append("choose another train.output_dir")
            raise ValueError(f"train.output_dir: {out} already holds {prior}; {', '.join(options[:-1])}, or "
                             f"{options[-1]}")
    t.output_dir = str(out)
    return out


def prepare_output_dir(cfg: Config) -> Path:
    """The main process, once the run is known to start: with `train.overwrite_output_dir`, remove what an
    earlier run wrote there (only distsft's own files and folders); create the directory and write the
    resolved config."""
    out = Path(cfg.train.output_dir)
    if cfg.train.overwrite_output_dir and (prior := prior_run(out)) is not None:
        logger.warning("train.overwrite_output_dir: replacing %s in %s", prior, out)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    return out


# ----------------------------------------------------------------------------------------------------
# Inputs


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path in (".", "..")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def check_model(model: ModelConfig) -> None:
    """The base model's source exists: a local directory with a config.json, or a hub id whose config loads
    (a download of one small file: a typo or a gated repository fails here, not after the data)."""
    from distsft.model import resolve_path

    if model.name_or_path is not None:
        key, source = "model.name_or_path", model.name_or_path
    else:
        key, source = "model.init_from_config", model.init_from_config
    try:
        path = resolve_path(source)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    p = Path(path).expanduser()
    if p.is_file():
        if key == "model.name_or_path":
            raise ValueError(f"{key}: {path} is a file; name the model's directory (or a hub id)")
        return
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{key}: {path} has no config.json (not a Hugging Face model directory)")
        return
    if _looks_local(path) or key == "model.init_from_config":
        raise ValueError(f"{key}: no such file or directory: {path}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as e:  # hub errors (missing repo, gated, offline) arrive as several exception types
        raise ValueError(f"{key}: cannot load the config of {path!r}: {_first_line(e)}") from None


def tokenizer_source(model: ModelConfig) -> tuple[str, str]:
    """(dotted key, source) of the tokenizer the run loads."""
    from distsft.model import resolve_path

    if model.tokenizer is not None:
        return "model.tokenizer", resolve_path(model.tokenizer)
    if model.name_or_path is not None:
        return "model.name_or_path", resolve_path(model.name_or_path)
    source = resolve_path(model.init_from_config)
    return "model.init_from_config", str(Path(source).parent) if Path(source).is_file() else source


def check_tokenizer(model: ModelConfig) -> None:
    """The tokenizer loads. A local model directory that holds none (a bare config such as
    launch/shapes/*) is named, with the setting that fixes it."""
    from distsft.model import load_tokenizer

    key, source = tokenizer_source(model)
    p = Path(source).expanduser()
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        hint = ("set model.tokenizer to a directory or hub id that has one (builtin:tiny-llama for a shape "
                "benchmark)" if key != "model.tokenizer" else "point model.tokenizer at one that has one")
        raise ValueError(f"{key}: {source} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); {hint}")
    if key == "model.tokenizer" and not p.exists() and _looks_local(source):
        raise ValueError(f"model.tokenizer: no such directory: {source}")
    try:
        load_tokenizer(model)
    except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError, ... for a bad source
        raise ValueError(f"{key}: cannot load a tokenizer from {source!r}: {_first_line(e)}") from None


def check_data_paths(data: DataConfig) -> None:
    """Every local data path exists (hub ids are loaded, and judged, by the data pipeline)."""
    from distsft.data.sources import ASSETS, COMPRESSIONS, DATA_SUFFIXES, file_kind, unreadable_reason

    def check(key: str, path: str) -> None:
        if path.startswith("memory:"):
            return
        if path.startswith("builtin:"):
            if not (ASSETS / path.removeprefix("builtin:")).exists():
                known = sorted(d.name for d in ASSETS.iterdir() if d.is_dir())
                raise ValueError(f"{key}: no builtin dataset {path!r} (known: {', '.join(known)})")
            return
        p = Path(path).expanduser()
        kind = file_kind(p)  # what the data pipeline reads: its suffixes, any case, and compressed forms
        if p.exists():
            if p.is_file() and kind is None:
                raise ValueError(f"{key}: {path}: unsupported file type {p.suffix!r} "
                                 f"(use {', '.join(DATA_SUFFIXES)}, or those compressed: {', '.join(COMPRESSIONS)})")
            if p.is_file() and (why := unreadable_reason(kind)):
                raise ValueError(f"{key}: {path}: {why}")
            return
        if kind is not None or _looks_local(path):
            raise ValueError(f"{key}: no such file or folder: {path}")

    for i, source in enumerate(data.sources):
        check(f"data.sources.{i}.path", source.path)
    if data.chat_template.endswith(".jinja") and not Path(data.chat_template).expanduser().is_file():
        raise ValueError(f"data.chat_template: no such file: {data.chat_template}")
    if data.eval_path:
        check("data.eval_path", data.eval_path)


def check_deepspeed_config(dist: DistributedConfig) -> None:
    if dist.deepspeed_config is None:
        return
    p = Path(dist.deepspeed_config)
    if not p.is_file():
        raise ValueError(f"distributed.deepspeed_config: no such file: {p}")
    try:
        json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"distributed.deepspeed_config: {p} is not valid JSON ({e})") from None


def check_save_merged(cfg: Config) -> None:
    """`checkpoint.save_merged` needs the whole base model in one process: not under ZeRO-3."""
    if not cfg.checkpoint.save_merged:
        return
    from distsft.distributed import requested_deepspeed

    if int((requested_deepspeed(cfg.distributed) or {}).get("zero_optimization", {}).get("stage", 0)) == 3:
        raise ValueError("checkpoint.save_merged=true is not supported under ZeRO-3 (the base weights are "
                         "partitioned); merge the exported adapter into the base model after training")


def check_resume(cfg: Config) -> None:
    """An explicit checkpoint exists and verifies (its manifest, every file's size and SHA-256)."""
    from distsft.checkpoint import CheckpointError, find_resume_checkpoint

    spec = cfg.checkpoint.resume_from_checkpoint
    if spec in (None, "auto"):
        return
    try:
        find_resume_checkpoint(cfg.train.output_dir, spec)
    except CheckpointError as e:
        msg = str(e).removeprefix("checkpoint.resume_from_checkpoint: ")
        raise ValueError(f"checkpoint.resume_from_checkpoint: {msg}") from None


def preflight(cfg: Config) -> Config:
    """Every check above, cheapest first; raises ValueError whose message starts with the dotted key.
    Writes nothing. Returns the config the run uses: a copy of `cfg` with `train.output_dir` resolved (see
    `resolve_output_dir`); `cfg` itself is left as it is. Also sets the warning filters (distsft.logs)
    first, before the libraries it loads can print."""
    from distsft.logs import quiet_libraries
    from distsft.tracking import check_trackers

    quiet_libraries()

    check_resume(cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))  # the run's copy, whose output
    resolve_output_dir(cfg)                                                # directory is set here
    check_data_paths(cfg.data)
    check_deepspeed_config(cfg.distributed)
    check_save_merged(cfg)
    check_trackers(cfg.logging)
    check_model(cfg.model)
    check_tokenizer(cfg.model)
    return cfg
