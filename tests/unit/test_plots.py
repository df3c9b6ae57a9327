"""Training curves: the JSONL reader (rewinds after a resume) and the PNG the command writes."""

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from distsft.config import LoggingConfig
from distsft.plots import main, plot_run, read_metrics
from distsft.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# matplotlib is a dev dependency (CI has it); elsewhere plot_run degrades, which the last test checks.
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")


def finished_run(out: Path) -> Path:
    """A run's log as the Tracker writes it: train loss and lr every step, eval loss and throughput
    every other step, an event, and a resume that rewinds from step 6 to step 4."""
    t = Tracker(LoggingConfig(), out, is_main=True, config_dict={})
    for step in range(1, 7):
        t.log({"train/loss": 3.0 - 0.1 * step, "train/learning_rate": 1e-4 * step}, step=step)
        if step % 2 == 0:
            t.log({"eval/loss": 3.1 - 0.1 * step, "perf/input_tokens_per_s": 1000.0 + step,
                   "perf/label_tokens_per_s": 400.0 + step}, step=step)
        if step == 4:
            t.event("checkpoint_saved", step=4, path="x")
    t.close(exit_code=1)
    t = Tracker(LoggingConfig(), out, is_main=True, config_dict={}, start_step=4, run_id=t.run_id)
    t.event("resumed", step=4)
    for step in range(5, 9):
        t.log({"train/loss": 1.0 - 0.1 * step, "train/learning_rate": 2e-4}, step=step)
    t.close()
    return out / "metrics.jsonl"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_read_metrics_keeps_the_resumed_trajectory(tmp_path):
    series = read_metrics(finished_run(tmp_path / "run"))
    loss = dict(series["train/loss"])
    assert sorted(loss) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert loss[4] == pytest.approx(2.6)  # kept from before the checkpoint
    assert loss[5] == pytest.approx(0.5) and loss[6] == pytest.approx(0.4)  # attempt 2 replaced attempt 1
    assert [s for s, _ in series["eval/loss"]] == [2, 4]  # attempt 1's step-6 eval was rewound away
    assert "event" not in series and "time" not in series


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "time": 0.0, "train/loss": 2.0}\n{"step": 2, "time": 0.0, "train/lo')
    assert read_metrics(log) == {"train/loss": [(1, 2.0)]}


@needs_mpl
def test_plot_command_writes_a_png(tmp_path):
    run_dir = tmp_path / "run"
    finished_run(run_dir)
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "distsft.plots", str(run_dir), "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000
    assert png_size(out) == (1650, 418)  # three 5 x 3.8 inch panels at 110 dpi
    assert not list(tmp_path.glob("*.tmp"))


@needs_mpl
def test_plot_default_output_and_missing_log(tmp_path, capsys):
    run_dir = tmp_path / "run"
    finished_run(run_dir)
    assert main([str(run_dir / "metrics.jsonl")]) == 0
    assert png_size(run_dir / "training_curves.png")[0] > 0
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics log" in capsys.readouterr().err


def test_plot_without_matplotlib_warns_and_returns_none(tmp_path, monkeypatch, caplog):
    log = finished_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_run(log, tmp_path / "x.png") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "x.png").exists()
