"""How a training process ends, whatever happens to it: exit codes, the status records launchers read,
preemption signals from the first line of the process on, and a torchrun agent that dies under its workers.

    PREEMPTION.install()     # first thing in every entry point, before torch is imported
    watch_agent()            # a torchrun worker: stop when the agent that started it is gone
    PREEMPTION.defer()       # the training loop: a signal only sets the flag (agreed at a step boundary, saved)
    PREEMPTION.requeue(step, tracker=..., checkpoint_dir=..., barrier=..., is_main=...)  # the loop, once saved
    PREEMPTION.expedite()    # after the loop: a signal ends the process at once again
    NonFiniteSteps(abort=False, max_in_a_row=5).skipped(step, loss, grad_norm)   # or TrainingDiverged (65)

A preemption signal (SIGTERM, SIGUSR1) always ends the process with REQUEUE_EXIT_CODE and a status record
(RELIABILITY.md promise 6). Outside the loop there is no state worth saving: before it, nothing has trained
since the checkpoint this attempt resumed from (or since step 0); after it, the final checkpoint is
committed. So the handler exits right there, within milliseconds, wherever the process is (loading a
model, tokenizing, waiting in a collective for a rank that is loading), rather than finishing minutes of
start-up that torchrun's and Slurm's grace period of ~30 s would cut with SIGKILL. Inside the loop it only
sets a flag: the ranks agree on it at the next step boundary, save together, and leave through
`exit_now`.

This module imports no torch at module level: the entry points install the handler before the imports
that take seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("distsft")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "preempted, run me again (checkpoint.resume_from_checkpoint=auto)"
NONRETRYABLE_EXIT_CODE = 65  # EX_DATAERR: diverged (non-finite losses); retrying would do the same


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row (`NonFiniteSteps`): the process exits with NONRETRYABLE_EXIT_CODE."""


class NonFiniteSteps:
    """`distributed.nonfinite_loss`: a step whose loss or gradient norm is non-finite (decided on global
    values, so every rank agrees) is skipped with a warning; with `abort`, or after `max_in_a_row` such
    steps in a row, the run ends with TrainingDiverged."""

    def __init__(self, *, abort: bool, max_in_a_row: int):
        self.abort, self.max_in_a_row, self.in_a_row = abort, max_in_a_row, 0

    def skipped(self, step: int, loss: float, grad_norm: float) -> bool:
        """Whether `step` was skipped: its loss or gradient norm is non-finite."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        logger.warning("step %d: non-finite loss %s / grad norm %s: optimizer step skipped", step, loss, grad_norm)
        if self.abort or self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(f"step {step}: {self.in_a_row} non-finite step(s) in a row")
        return True


# ----------------------------------------------------------------------------------------------------
# Status records


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def write_exit_status(reason: str, exit_code: int, step: int | None = None) -> None:
    """For launchers that only see torchrun's exit code (any failed worker makes it 1): the file named by
    DISTSFT_STATUS_FILE (set by launch/multinode.sh and launch/slurm.sbatch) gets the real reason."""
    path = os.environ.get("DISTSFT_STATUS_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"reason": reason, "exit_code": exit_code, "step": step}, f)


def report_outcome(exit_code: int, reason: str, message: str | None = None, *, step: int | None = None,
                   status_file: bool = True) -> None:
    """Tell the launchers why this rank ends: `DISTSFT_STATUS_DIR/rank-<R>.json` (the `distsft train`
    launcher reads it; `time` lets it tell a cause from its consequences, see cli._worst), and on rank 0
    `DISTSFT_STATUS_FILE` (launch scripts around a plain torchrun) unless `status_file` is false."""
    status_dir = os.environ.get("DISTSFT_STATUS_DIR")
    if status_dir:
        record = {"rank": _rank(), "exit_code": exit_code, "reason": reason, "message": message,
                  "time": time.time()}
        tmp = Path(status_dir) / f".rank-{_rank()}.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(Path(status_dir) / f"rank-{_rank()}.json")
    if status_file and _rank() == 0:
        write_exit_status(reason, exit_code, step)


def exit_now(code: int) -> None:
    """End the process with `code` at once: flush what was printed and skip interpreter finalization.
    Finalization takes seconds after a distributed run (DeepSpeed's and gloo's native threads), and restores
    the default SIGTERM action early on: torchrun SIGTERMs the ranks still alive when the first one exits,
    which turned one rank in two's 75 into -15."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (the agent is gone): nowhere to flush
            stream.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------------
# Preemption


class PreemptionFlag:
    """SIGTERM and SIGUSR1: outside the loop, end the process with REQUEUE_EXIT_CODE at once; inside it
    (`defer`), only set a flag, which the loop asks for with `agreed()` at every step boundary (an
    all-reduce, so that every rank stops at the same step) and evaluation polls between batches. A second
    signal changes nothing: one save, then exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False
        self.committed_step: int | None = None  # after the loop: the step of the final checkpoint
        self._previous: dict | None = None

    def install(self) -> bool:
        """Take SIGTERM and SIGUSR1 (main thread). Returns False, changing nothing, when already installed
        (the entry point did it at process start); True when this call installed it (then `restore`)."""
        if self._previous is not None:
            return False
        self.signum, self.deferred, self.committed_step = None, False, None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return True

    def defer(self) -> PreemptionFlag:
        """From here on a signal only sets the flag (the loop saves). Re-takes the signals, in case a
        library changed a handler while the model was built."""
        if self._previous is None:
            self.install()
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        self.deferred = True
        return self

    def expedite(self, committed_step: int) -> None:
        """After the loop, once the checkpoint of `committed_step` is committed: a signal ends the process at
        once again; one that arrived after the last step boundary was agreed on ends it now."""
        self.deferred, self.committed_step = False, committed_step
        if self.signum is not None:
            self._exit(self.signum)

    def _handler(self, signum, frame):
        first = self.signum is None
        if first:
            self.signum = signum
        if not self.deferred:
            self._exit(signum)
        elif first:
            logger.warning("received %s: will save a checkpoint and exit at the next step boundary",
                           signal.Signals(signum).name)

    def _exit(self, signum: int) -> None:
        name = signal.Signals(signum).name
        logger.warning("received %s outside the training loop: nothing to save since the last checkpoint; "
                       "exiting with %d for requeue", name, REQUEUE_EXIT_CODE)
        report_outcome(REQUEUE_EXIT_CODE, "preempted", f"{name} outside the training loop", step=self.committed_step)
        exit_now(REQUEUE_EXIT_CODE)

    def requeue(self, step: int, *, tracker, checkpoint_dir: Path, barrier: Callable[[], None], is_main: bool):
        """In the loop, once every rank agreed on the signal and the checkpoint of `step` is committed: record
        it (the tracker's event and exit code, the status file), wait for every rank, and leave with
        REQUEUE_EXIT_CODE (SystemExit; every rank then exits at once, distsft.entry.run_to_exit)."""
        tracker.event("preempted", step, signal=self.signum, checkpoint=str(checkpoint_dir))
        if is_main:
            write_exit_status("preempted", REQUEUE_EXIT_CODE, step)
        tracker.close(exit_code=REQUEUE_EXIT_CODE)
        logger.warning("preempted: checkpoint at step %d committed; exiting with %d for requeue",
                       step, REQUEUE_EXIT_CODE)
        barrier()
        raise SystemExit(REQUEUE_EXIT_CODE)

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was signalled (a collective: every rank calls it)."""
        import torch

        local = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(local, "max").item() > 0)

    def restore(self) -> None:
        """Give the signals back to the handlers found at `install` (the Python API, after a run)."""
        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous, self.deferred, self.committed_step = None, False, None


PREEMPTION = PreemptionFlag()
"""The process's one flag: entry points install it first thing, `train.main` defers it for the loop."""


# ----------------------------------------------------------------------------------------------------
# The torchrun agent's death

AGENT_POLL_S = 1.0


def watch_agent(poll_s: float = AGENT_POLL_S) -> bool:
    """In a worker that torchrun's agent started (TORCHELASTIC_RUN_ID is set), watch the parent: torchrun
    starts every worker in a session of its own, so when the agent is killed nothing reaches the workers,
    which trained and wrote checkpoints on, unsupervised. Once the parent is gone (the worker is
    re-parented) it is a preemption: SIGTERM to this process, which then saves at the next step boundary
    (or exits at once outside the loop) with REQUEUE_EXIT_CODE. A daemon thread polling `getppid` (a
    parent-death signal would fire when the agent's *thread* that spawned the worker ends). Returns whether
    it watches."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False  # started by hand or by a shell: its parent's exit is no reason to stop
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.warning("the torchrun agent (pid %d) is gone: stopping as on a preemption signal", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="distsft-agent-watch", daemon=True).start()
    return True


# ----------------------------------------------------------------------------------------------------
# Test hooks


def injected_fault(name: str, step: int, rank: int) -> bool:
    """Test hook: DISTSFT_TEST_FAULT="<name>@<step>@<rank>" makes `name` happen there (the multi-process
    tests kill a rank inside a save, feed it a NaN loss, freeze it, or signal it during start-up). Never
    set in real runs."""
    spec = os.environ.get("DISTSFT_TEST_FAULT", "")
    return bool(spec) and spec == f"{name}@{step}@{rank}"


def injected_signal(name: str, step: int, rank: int, sig: str) -> None:
    """Test hook: this process sends itself `sig` (SIGTERM, SIGSTOP) where DISTSFT_TEST_FAULT names."""
    if injected_fault(name, step, rank):
        os.kill(os.getpid(), getattr(signal, sig))
