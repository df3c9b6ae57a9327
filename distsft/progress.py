"""Step timing, throughput, MFU, memory and ETA per logging window; the progress bar; the run summary.

    timer = StepTimer()                                   # every rank
    meter = ThroughputMeter(world_size=W, peak_flops=peak_flops(name, cfg.logging.peak_tflops),
                            total_steps=max_steps, start_step=step, device=acc.device, model_config=hf_config)
    with timer.phase("data"): batch = collate(samples, pad_token_id=pad); meter.observe(samples, batch)
    with timer.phase("fwd_bwd"): ...
    metrics = meter.compute(step, timer=timer, reduce=lambda t: acc.reduce(t, "sum"))      # every rank

Counts given to `observe` (a micro-batch) and `update` (any counts) are this rank's; `compute`/`totals` sum
them over ranks with `reduce` (a collective: call it on every rank at the same step), or, with no `reduce`,
take them as already global. Metric names: `data/batch_fill` (real tokens / padded slots, this rank's),
`perf/*` (throughput, MFU), `time/*` (seconds per optimizer step by phase), `mem/*` (GiB, this rank's CUDA
allocator; absent on CPU), `progress/eta_s`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

from distsft.flops import doc_lengths_from_position_ids, mfu, train_flops

logger = logging.getLogger("distsft.progress")

GiB = 1024**3
PHASES = ("data", "fwd_bwd", "optimizer", "comm")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class StepTimer:
    """Wall time per phase of the step, summed over a logging window. Phases: `data` (waiting for the
    next batch), `fwd_bwd`, `optimizer` (clip, step, zero_grad), `comm` (explicit collectives such as
    the global label-token count; gradient all-reduce overlapped with backward stays in `fwd_bwd`).
    Phases must not nest. With `cuda_sync` (default: when CUDA is in use) each phase ends with
    `torch.cuda.synchronize()` so asynchronous kernels are charged to the phase that launched them."""

    def __init__(self, *, cuda_sync: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        self.cuda_sync = cuda_sync
        self._clock = clock
        self._acc: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        sync = _cuda_available() if self.cuda_sync is None else self.cuda_sync
        t0 = self._clock()
        try:
            yield
        finally:
            if sync:
                import torch

                torch.cuda.synchronize()
            self._acc[name] = self._acc.get(name, 0.0) + self._clock() - t0

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop (only phases that ran), then reset."""
        out, self._acc = self._acc, {}
        return out


def _memory() -> dict[str, float]:
    if not _cuda_available():
        return {}
    import torch

    out = {
        "mem/allocated_gib": torch.cuda.memory_allocated() / GiB,
        "mem/reserved_gib": torch.cuda.memory_reserved() / GiB,
        "mem/peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
    }
    torch.cuda.reset_peak_memory_stats()  # the next window's peak is its own
    return out


_COUNTS = ("samples", "input_tokens", "label_tokens", "flops")


class ThroughputMeter:
    """Throughput, MFU, step-time split, memory and ETA per logging window, and totals for the run.

    `peak_flops`: one device's peak FLOP/s (`flops.peak_flops`), None to omit MFU. `total_steps`: the
    run's last optimizer step, for the ETA. `start_step`: the step the loop starts from (a resume).
    `model_config` (the HF config) and `lora_params` (`flops.trainable_params`): what `observe` counts the
    model FLOPs of a micro-batch with."""

    def __init__(
        self,
        *,
        world_size: int = 1,
        peak_flops: float | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
        device: Any = None,
        model_config: Any = None,
        lora_params: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.world_size = world_size
        self.model_config, self.lora_params = model_config, lora_params
        self._clock = clock
        self.peak_flops = peak_flops
        self.total_steps = total_steps
        self.device = device
        self._start_step = self._window_step = start_step
        self._t0 = self._window_t0 = clock()
        self._pending = dict.fromkeys(_COUNTS, 0.0)  # this rank's counts not yet reduced
        self._window = dict.fromkeys(_COUNTS, 0.0)  # global counts of the current window
        self._total = dict.fromkeys(_COUNTS, 0.0)
        self._peak_mem_gib = 0.0
        self._last_step = start_step
        self._fill = [0, 0]  # this rank's real tokens and padded slots in the current window

    def observe(self, samples: list[dict], batch: dict) -> None:
        """Count one micro-batch of this rank: the dataset rows `samples` as `collate` padded them into
        `batch`. Documents, tokens fed (padding excluded), tokens in the loss, model FLOPs (when a
        `model_config` was given) and the window's batch fill."""
        import torch

        from distsft.loss import count_targets

        lengths = torch.tensor([len(x["input_ids"]) for x in samples])
        real = torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]  # (B, T) not padding
        docs = doc_lengths_from_position_ids(batch["position_ids"], real)
        flops = 0.0 if self.model_config is None else train_flops(self.model_config, docs, lora_params=self.lora_params)
        self.update(samples=len(docs), input_tokens=int(lengths.sum()), label_tokens=count_targets([batch]),
                    flops=flops)
        self._fill[0] += int(lengths.sum())
        self._fill[1] += real.numel()

    def update(self, *, samples: int, input_tokens: int, label_tokens: int, flops: float = 0.0) -> None:
        """Add this rank's work (per micro-batch or per step): documents/rows, tokens fed to the model
        (padding excluded), tokens in the loss, model FLOPs (`flops.train_flops`)."""
        p = self._pending
        p["samples"] += samples
        p["input_tokens"] += input_tokens
        p["label_tokens"] += label_tokens
        p["flops"] += flops

    def _flush(self, reduce: Callable[[Any], Any] | None) -> None:
        values = [self._pending[k] for k in _COUNTS]
        if reduce is not None:
            import torch

            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            values = [float(v) for v in reduce(t).tolist()]
        for k, v in zip(_COUNTS, values, strict=True):
            self._window[k] += v
            self._total[k] += v
        self._pending = dict.fromkeys(_COUNTS, 0.0)

    def compute(self, step: int, *, timer: StepTimer | None = None,
                reduce: Callable[[Any], Any] | None = None) -> dict[str, float]:
        """Metrics for the window since the last call (ending at optimizer step `step`), then reset it."""
        self._flush(reduce)
        now = self._clock()
        dt = max(now - self._window_t0, 1e-9)
        steps = max(step - self._window_step, 1)
        w, ws = self._window, self.world_size
        out: dict[str, float] = {"data/batch_fill": self._fill[0] / self._fill[1]} if self._fill[1] else {}
        out |= {
            "perf/samples_per_s": w["samples"] / dt,
            "perf/input_tokens_per_s": w["input_tokens"] / dt,
            "perf/label_tokens_per_s": w["label_tokens"] / dt,
            "perf/input_tokens_per_s_per_gpu": w["input_tokens"] / dt / ws,
            "perf/label_tokens_per_s_per_gpu": w["label_tokens"] / dt / ws,
            "perf/step_time_s": dt / steps,
        }
        if w["flops"] > 0:
            per_gpu = w["flops"] / dt / ws
            out["perf/tflops_per_gpu"] = per_gpu / 1e12
            m = mfu(per_gpu, self.peak_flops)
            if m is not None:
                out["perf/mfu"] = m
        if timer is not None:
            phases = timer.pop()
            for name, secs in phases.items():
                out[f"time/{name}_s"] = secs / steps
            if phases:
                out["time/other_s"] = max(dt - sum(phases.values()), 0.0) / steps
        mem = _memory()
        out.update(mem)
        self._peak_mem_gib = max(self._peak_mem_gib, mem.get("mem/peak_allocated_gib", 0.0))
        if self.total_steps is not None:
            out["progress/eta_s"] = max(self.total_steps - step, 0) * dt / steps
        self._window, self._fill = dict.fromkeys(_COUNTS, 0.0), [0, 0]
        self._window_t0, self._window_step, self._last_step = now, step, step
        return out

    def elapsed(self) -> float:
        """Seconds since the meter started (this process's session of the run)."""
        return self._clock() - self._t0

    def totals(self, step: int | None = None, *, reduce: Callable[[Any], Any] | None = None) -> dict[str, Any]:
        """Totals since the meter started (a collective when `reduce` is given): steps, samples, tokens,
        seconds, mean throughput and MFU, peak memory (GiB, None on CPU)."""
        self._flush(reduce)
        mem = _memory()
        self._peak_mem_gib = max(self._peak_mem_gib, mem.get("mem/peak_allocated_gib", 0.0))
        end = self._last_step if step is None else step
        secs = max(self._clock() - self._t0, 1e-9)
        t, ws = self._total, self.world_size
        out: dict[str, Any] = {
            "steps": end - self._start_step,
            "final_step": end,
            "world_size": ws,
            "samples": int(t["samples"]),
            "input_tokens": int(t["input_tokens"]),
            "label_tokens": int(t["label_tokens"]),
            "train_seconds": secs,
            "input_tokens_per_s": t["input_tokens"] / secs,
            "input_tokens_per_s_per_gpu": t["input_tokens"] / secs / ws,
            "label_tokens_per_s": t["label_tokens"] / secs,
            "mfu": mfu(t["flops"] / secs / ws, self.peak_flops) if t["flops"] > 0 else None,
            "peak_memory_gib": self._peak_mem_gib if mem else None,
            "device": getattr(self.device, "type", None) or (str(self.device).split(":")[0] if self.device else None),
        }
        return out


# ----------------------------------------------------------------------------------------------------
# Console


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A tqdm bar on the main process (no-op elsewhere) with the latest loss, learning rate, throughput
    and ETA; with `enabled=False` on the main process, one log line per `log` call instead."""

    _POSTFIX = (("train/loss", "loss"), ("train/learning_rate", "lr"), ("perf/input_tokens_per_s", "tok/s"),
                ("perf/mfu", "mfu"), ("eval/loss", "eval"))

    def __init__(self, total: int | None, *, initial: int = 0, is_main: bool = True, enabled: bool = True,
                 desc: str = "train"):
        self.is_main = is_main
        self._bar = None
        if is_main and enabled:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             mininterval=1.0 if tty else 30.0, file=sys.stderr)

    def update(self, step: int) -> None:
        """Move the bar to optimizer step `step`."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Show a logging window's metrics: in the bar's postfix, or as a log line."""
        if not self.is_main:
            return
        post = {short: _fmt(metrics[k]) for k, short in self._POSTFIX if metrics.get(k) is not None}
        if "progress/eta_s" in metrics and self._bar is None:  # the bar shows its own remaining time: one ETA
            post["eta"] = format_duration(metrics["progress/eta_s"])
        if self._bar is not None:
            self.update(step)
            self._bar.set_postfix(post, refresh=False)
        else:
            logger.info("step %d | %s", step, " | ".join(f"{k} {v}" for k, v in post.items()))

    def write(self, message: str) -> None:
        """Print a line on the main process without breaking the bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def print_summary(
    totals: Mapping[str, Any],
    *,
    train_loss: float | None = None,
    train_loss_steps: int | None = None,
    final_eval_loss: float | None = None,
    best_eval_loss: float | None = None,
    run_label_tokens: int | None = None,
    run_train_seconds: float | None = None,
    adapter_dir: str | None = None,
    extra: Mapping[str, Any] | None = None,
    enabled: bool = True,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The end-of-run summary: printed as a table when `enabled` (the main process), and returned as the
    dict it prints (for `Tracker.summary`); entries that are None are left out.

    `totals` is `ThroughputMeter.totals()`: this process's session (a resumed run's last segment). The loss
    is one number and says which: `train_loss`, the mean over the last `train_loss_steps` optimizer steps
    (one logging window). `run_label_tokens`, `run_train_seconds`: over the whole run (counted on in the
    checkpoints), so that a resumed run's summary covers all of it; its steps come from `totals` (`final_step`)."""
    d: dict[str, Any] = dict(totals)
    start = d.get("final_step", 0) - d.get("steps", 0)
    d.update(final_train_loss=train_loss, final_train_loss_steps=train_loss_steps, final_eval_loss=final_eval_loss,
             best_eval_loss=best_eval_loss, adapter_dir=adapter_dir)
    if start > 0:  # resumed: the run's totals beside this session's
        d.update(resumed_at_step=start, run_label_tokens=run_label_tokens, run_train_seconds=run_train_seconds)
    d.update(extra or {})
    d = {k: v for k, v in d.items() if v is not None}
    if enabled:
        gpu = d.get("device", "cuda") == "cuda"
        unit = "GPU" if gpu else "process"
        labels = {
            "steps": "optimizer steps", "final_step": "final step", "world_size": "GPUs" if gpu else "processes (CPU)",
            "samples": "documents", "input_tokens": "input tokens", "label_tokens": "label tokens",
            "train_seconds": "train time" + (", this session" if start > 0 else ""),
            "input_tokens_per_s": "input tokens/s",
            "input_tokens_per_s_per_gpu": f"input tokens/s per {unit}", "label_tokens_per_s": "label tokens/s",
            "mfu": "MFU", "peak_memory_gib": "peak memory (GiB)",
            "final_train_loss": f"train loss, mean of the last {d.get('final_train_loss_steps', '?')} steps",
            "final_eval_loss": "eval loss (last)", "best_eval_loss": "eval loss (best)", "adapter_dir": "adapter",
            "run_label_tokens": "label tokens, whole run", "run_train_seconds": "train time, whole run",
        }
        hidden = {"final_train_loss_steps", "device", "resumed_at_step"} | ({"final_step"} if start == 0 else set())
        rows = []
        for k, v in d.items():
            if k in hidden:
                continue
            if k in ("train_seconds", "run_train_seconds"):
                text = format_duration(v)
            elif k == "mfu":
                text = f"{100 * v:.1f}%"
            elif k == "steps" and start > 0:
                text = f"{v:,} this session (resumed at step {start:,} of {d.get('final_step', 0):,})"
            elif isinstance(v, int) and not isinstance(v, bool):
                text = f"{v:,}"
            else:
                text = _fmt(v)
            rows.append((labels.get(k, k), text))
        width = max(len(label) for label, _ in rows)
        title = "run summary" + (" (this session's counts and rates; the run's loss)" if start > 0 else "")
        print_fn("\n".join([title, *(f"  {label:<{width}}  {text}" for label, text in rows)]))
    return d
