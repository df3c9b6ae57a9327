"""How a process ends (distsft/lifecycle.py): preemption signals in and out of the loop, the status records,
and which rank's outcome the `distsft train` launcher reports. One small Python process per case, no torch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from distsft.cli import _worst


def run_snippet(code: str, tmp_path, **env) -> tuple[subprocess.CompletedProcess, dict | None]:
    status = tmp_path / "status.json"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DISTSFT_STATUS_FILE": str(status), **env})
    return proc, json.loads(status.read_text()) if status.exists() else None


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_outside_the_loop_exits_75_at_once_with_a_status(tmp_path, sig):
    """Regression (issue 22, fault 5): before the loop a signal killed the process (-15, no status file), so
    nothing requeued it. Now it exits with 75 and a status record at once, wherever the process is."""
    proc, status = run_snippet(f"""
        import os, signal, time
        from distsft.lifecycle import PREEMPTION
        PREEMPTION.install()
        os.kill(os.getpid(), signal.{sig})
        time.sleep(60)  # never reached: the handler ends the process
        print("survived")
    """, tmp_path, DISTSFT_STATUS_DIR=str(tmp_path))
    assert proc.returncode == 75 and "survived" not in proc.stdout, proc.stderr
    assert f"received {sig} outside the training loop" in proc.stderr
    assert status == {"reason": "preempted", "exit_code": 75, "step": None}
    record = json.loads((tmp_path / "rank-0.json").read_text())
    assert record["exit_code"] == 75 and record["reason"] == "preempted" and record["time"] > 0


def test_in_the_loop_a_signal_only_sets_the_flag_and_after_it_ends_the_process(tmp_path):
    """Deferred (the loop): signals set the flag, once; expedite (after the final checkpoint) ends the
    process with 75 and the step of that checkpoint."""
    proc, status = run_snippet("""
        import os, signal
        from distsft.lifecycle import PREEMPTION
        PREEMPTION.install()
        PREEMPTION.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        print("flag", PREEMPTION.signum == signal.SIGTERM, flush=True)
        PREEMPTION.expedite(12)
        print("survived")
    """, tmp_path)
    assert proc.returncode == 75 and "flag True" in proc.stdout and "survived" not in proc.stdout, proc.stderr
    assert proc.stderr.count("will save a checkpoint") == 1  # a second signal changes nothing
    assert status == {"reason": "preempted", "exit_code": 75, "step": 12}


def test_the_launcher_reports_the_cause_not_its_consequences():
    """Regression (issue 22, fault 5): a rank preempted before the loop makes the others' collectives fail;
    the launcher preferred any crash over a preemption and reported 1 (not requeued). It now reports the
    earliest outcome that is not a success: a crash that made the others stop is still the crash."""
    preempted = {"rank": 0, "exit_code": 75, "reason": "preempted", "message": None, "time": 100.0}
    consequence = {"rank": 1, "exit_code": 1, "reason": "crash", "message": "RuntimeError: peer closed",
                   "time": 100.4}
    assert _worst([preempted, consequence]) is preempted
    crash = {**consequence, "time": 99.0}
    assert _worst([preempted, crash]) is crash
    done = {"rank": 0, "exit_code": 0, "reason": "done", "message": None, "time": 1.0}
    assert _worst([done, {**done, "rank": 1}])["exit_code"] == 0 and _worst([]) is None
