"""Helpers shared by the test tiers (imported as `_support`: every tier's directory is on sys.path, and
a name of our own cannot collide the way several `conftest` modules do)."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_TOKENIZER = "builtin:tiny-llama"


def write_tiny_llama(directory: Path, **overrides) -> Path:
    """A 2-layer Llama config (GQA, vocab of the demo tokenizer) as `directory/config.json`."""
    base = json.loads((REPO / "distsft" / "assets" / "tiny-llama" / "config.json").read_text())
    base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    base.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(base))
    return directory


def _latest_change(root: Path) -> float:
    """The newest modification time of any file or folder under `root` (0 when absent)."""
    import contextlib
    import os

    newest = 0.0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):  # removed while we looked (a rotated checkpoint, a staging dir)
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest


def run_with_progress(cmd, *, cwd, env=None, watch: Path | None = None, idle_s: float = 600.0,
                      poll_s: float = 2.0):
    """`subprocess.run(cmd, capture_output=True, text=True)` that fails a *hang*, not a slow machine: the
    command may take as long as it needs while it makes progress (prints anything, or changes a file
    under `watch`); `idle_s` seconds without either kill its whole process group and fail the test. A
    fixed total limit trips on a busy 2-core machine long before anything is wrong."""
    import contextlib
    import os
    import signal
    import subprocess
    import threading
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    chunks = {"out": [], "err": []}
    last = [time.monotonic()]

    def pump(stream, key):
        for line in stream:
            chunks[key].append(line)
            last[0] = time.monotonic()

    readers = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in readers:
        t.start()
    seen = _latest_change(watch) if watch is not None else 0.0
    while proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=poll_s)  # returns as soon as it exits
        if watch is not None and (changed := _latest_change(watch)) > seen:
            seen, last[0] = changed, time.monotonic()
        if time.monotonic() - last[0] > idle_s:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for t in readers:
                t.join(timeout=5)
            tail = "".join(chunks["out"])[-3000:] + "".join(chunks["err"])[-3000:]
            raise AssertionError(f"no output and no file change for {idle_s:.0f} s: hung? {cmd}\n{tail}")
    for t in readers:
        t.join(timeout=30)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(chunks["out"]), "".join(chunks["err"]))
