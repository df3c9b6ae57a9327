"""Metrics tracking: one `Tracker` with the same methods on every rank, real on the main process only.

    check_trackers(cfg.logging)            # before any GPU work: fails fast on a missing package or W&B key
    tracker = Tracker(cfg.logging, out, is_main=acc.is_main_process, config_dict=cfg.to_dict(),
                      run_id=saved_run_id, world_size=acc.num_processes, start_step=resumed_step)
    tracker.log({"train/loss": 1.23, "train/learning_rate": 2e-4}, step=10)
    tracker.event("checkpoint_saved", step=10, path="...")
    tracker.summary({...}); tracker.close()

Always written: `output_dir/metrics.jsonl`, one JSON object per line, appended across resumes:
    {"step": 10, "time": 1732400000.1, "train/loss": 1.23, ...}           a metrics record
    {"event": "checkpoint_saved", "step": 10, "time": ..., "path": ...}   an event record
Non-finite values are written as `null` (strict JSON). A resume from an earlier checkpoint appends
records whose steps go back; readers keep the latest record per step (`distsft.plots` does).
`summary.json` holds the end-of-run summary. With `report_to: [tensorboard]`, event files go to
`output_dir/tensorboard/`; with `wandb`, the run directory is `output_dir/wandb/` (offline runs are
uploaded later with `wandb sync output_dir/wandb/offline-run-*`; pieces of one resumed run share an id
and are synced into the same run in order).

Secrets: everything sent anywhere passes through `redact` (distsft/redaction.py) first (the config, events,
the summary, W&B's run name, notes, tags and group, and the command line W&B records).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import string
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distsft.config import LoggingConfig
from distsft.redaction import netrc_wandb_keys, redact

logger = logging.getLogger("distsft.tracking")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# ----------------------------------------------------------------------------------------------------
# Startup checks


def _wandb_mode(cfg: LoggingConfig) -> str:
    if cfg.wandb_mode is not None:
        return cfg.wandb_mode
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "online").strip().lower() or "online"
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def _wandb_key_available() -> bool:
    """An API key without asking the network: the environment, an identity token file, or netrc."""
    if os.environ.get("WANDB_API_KEY", "").strip() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    return bool(netrc_wandb_keys())


def check_trackers(cfg: LoggingConfig) -> None:
    """Fail fast, before any GPU work, when a tracker in `report_to` cannot work: raises ValueError."""
    if "wandb" in cfg.report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError(
                "logging.report_to: includes 'wandb' but the wandb package is not installed; "
                "`pip install wandb`, or remove wandb from logging.report_to"
            ) from None
        mode = _wandb_mode(cfg)
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"WANDB_MODE={os.environ.get('WANDB_MODE')!r}: expected online, offline or disabled")
        if mode == "online" and not _wandb_key_available():
            raise ValueError(
                "logging.report_to: includes 'wandb' in online mode but no W&B API key was found "
                "(WANDB_API_KEY, or `wandb login` writing ~/.netrc); set one, or run offline with "
                "WANDB_MODE=offline (or logging.wandb_mode=offline) and `wandb sync` later"
            )
    if "tensorboard" in cfg.report_to:
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ValueError(
                "logging.report_to: includes 'tensorboard' but the tensorboard package is not installed; "
                "`pip install tensorboard`, or remove tensorboard from logging.report_to"
            ) from None


# ----------------------------------------------------------------------------------------------------
# The tracker


@contextlib.contextmanager
def _redacted_argv():
    """`sys.argv` with secrets replaced while W&B starts a run: it records the command line (its `args`)
    in the run's metadata, and a secret typed into a dotted override is in it."""
    saved = list(sys.argv)
    sys.argv[:] = redact(saved, by_key=False)
    try:
        yield
    finally:
        sys.argv[:] = saved


def new_run_id() -> str:
    """A fresh W&B-compatible run id (8 lowercase letters and digits, like W&B's own)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _finite(obj: Any) -> Any:
    """Non-finite floats -> None, recursively: the JSON written stays strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_RESERVED = {"step", "time", "event"}


def _scalar(key: str, value: Any) -> float | int | None:
    if hasattr(value, "item"):  # 0-d torch tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if key in _RESERVED:
        raise ValueError(f"metric name {key!r} is reserved for the JSONL record itself")
    if not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """Metrics to `metrics.jsonl` and to W&B / TensorBoard as `cfg.report_to` asks.

    Every rank builds one and calls the same methods; only `is_main` does anything, so the training loop
    never branches on the rank. `run_id` names the W&B run: pass the one stored in the checkpoint on
    resume and W&B continues that run (`resume="allow"`). A fresh id is generated per process, so on a
    fresh start store the main process's `tracker.run_id` (the checkpoint committer is the main process)
    or broadcast one `new_run_id()` before building the tracker. `start_step`: the optimizer step the
    run resumes from (the checkpoint's step), None on a fresh start; TensorBoard then drops the points an
    interrupted attempt logged after that step.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        output_dir: str | os.PathLike,
        *,
        is_main: bool,
        config_dict: dict[str, Any],
        run_id: str | None = None,
        world_size: int = 1,
        start_step: int | None = None,
    ):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.run_id = run_id or new_run_id()
        self.world_size = world_size
        self._last_step = start_step if start_step is not None else -1
        self._closed = False
        self._jsonl = None
        self._wandb_run = None
        self._wandb_first_step = 0
        self._wandb_skip_warned = False
        self._tb = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        safe_config = redact(config_dict)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if start_step is None else start_step + 1
            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge)
            if start_step is None:
                text = json.dumps(safe_config, indent=2, default=str)
                self._tb.add_text("config", "```\n" + text + "\n```", 0)
        if "wandb" in cfg.report_to:
            self._init_wandb(safe_config)

    def _init_wandb(self, safe_config: dict[str, Any]) -> None:
        import wandb

        cfg = self.cfg
        # Every string W&B writes into its run files goes through `redact`: the run's name, notes, tags and
        # group as typed into the config, and the command line it records (sys.argv: the dotted overrides).
        safe = redact({"group": cfg.wandb_group, "name": cfg.run_name, "tags": list(cfg.wandb_tags) or None,
                       "notes": cfg.wandb_notes}, by_key=False)
        with _redacted_argv():
            self._wandb_run = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                job_type=cfg.wandb_job_type,
                id=self.run_id,
                resume="allow",
                mode=_wandb_mode(cfg),
                dir=str(self.output_dir),
                config=safe_config,
                **safe,
            )
        self._wandb_run.config.update({"world_size": self.world_size}, allow_val_change=True)
        # On a resume W&B holds the history up to its step; it drops anything logged below that, with a
        # warning per call. Steps an interrupted attempt logged after its last checkpoint stay as they were.
        self._wandb_first_step = int(getattr(self._wandb_run, "step", 0) or 0)

    # -- the loop's interface ----------------------------------------------------------------------

    def _check_step(self, step: int) -> None:
        if step < self._last_step:
            raise ValueError(f"tracker steps must not decrease: got step {step} after step {self._last_step}")
        self._last_step = step

    def _write(self, record: dict[str, Any]) -> None:
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record, allow_nan=False, default=str) + "\n")
        self._jsonl.flush()

    def _to_wandb(self, data: dict[str, Any], step: int) -> None:
        if self._wandb_run is None:
            return
        if step < self._wandb_first_step:
            if not self._wandb_skip_warned:
                logger.warning(
                    "W&B run %s already holds steps up to %d from before the resume; steps below %d go "
                    "to metrics.jsonl (and TensorBoard) only", self.run_id, self._wandb_first_step - 1,
                    self._wandb_first_step)
                self._wandb_skip_warned = True
            return
        self._wandb_run.log(data, step=step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record scalar metrics at an optimizer step. Steps never decrease (equal steps merge)."""
        if not self.is_main or self._closed:
            return
        self._check_step(step)
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        self._write({"step": step, "time": time.time(), **values})
        finite = {k: v for k, v in values.items() if v is not None}
        if self._tb is not None:
            for k, v in finite.items():
                self._tb.add_scalar(k, v, step)
        self._to_wandb(finite, step)

    def event(self, name: str, step: int, **fields: Any) -> None:
        """Record a one-off event (resumed, world_size_changed, checkpoint_saved, nonfinite_skip, ...):
        a JSONL record, a console line, numeric fields as `events/<name>/<field>` scalars in W&B and
        TensorBoard, and the fields as text in TensorBoard."""
        if not self.is_main or self._closed:
            return
        self._check_step(step)
        safe = _finite(redact(dict(fields)))
        if _RESERVED & safe.keys():
            raise ValueError(f"event fields must not be named {sorted(_RESERVED & safe.keys())}")
        self._write({"event": name, "step": step, "time": time.time(), **safe})
        logger.info("step %d: %s %s", step, name, " ".join(f"{k}={v}" for k, v in safe.items()))
        numeric = {f"events/{name}/{k}": (int(v) if isinstance(v, bool) else v)
                   for k, v in safe.items()
                   if isinstance(v, (int, float))}
        numeric[f"events/{name}"] = 1
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.add_text(f"events/{name}", json.dumps(safe, default=str), step)
        self._to_wandb(numeric, step)

    def summary(self, d: Mapping[str, Any]) -> None:
        """End-of-run summary: W&B run summary and `output_dir/summary.json` (replaced atomically)."""
        if not self.is_main or self._closed:
            return
        clean = _finite(redact(dict(d)))
        path = self.output_dir / SUMMARY_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, **clean}, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in clean.items() if v is not None})
        if self._tb is not None:
            self._tb.add_text("summary", "```\n" + json.dumps(clean, indent=2, default=str) + "\n```",
                              max(self._last_step, 0))

    def close(self, exit_code: int = 0) -> None:
        """Flush and close everything; a non-zero `exit_code` marks the W&B run failed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
