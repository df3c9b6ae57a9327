"""Training curves from a run's `metrics.jsonl`: loss (and eval loss), learning rate, throughput.

    python -m distsft.plots outputs/demo              # writes outputs/demo/training_curves.png
    python -m distsft.plots outputs/demo/metrics.jsonl -o curves.png

A resume from an earlier checkpoint appends records whose steps go back: the points an interrupted
attempt logged after that step are dropped, so each curve shows the trajectory the run kept.
matplotlib is optional: without it `plot_run` warns and returns None.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("distsft.plots")

DEFAULT_PNG = "training_curves.png"
# (panel title, y label, [(metric name and its aliases, legend label)])
PANELS = [
    ("Loss", "loss", [(("train/loss", "loss", "train_loss"), "train"), (("eval/loss", "eval_loss"), "eval")]),
    ("Learning rate", "lr", [(("train/learning_rate", "train/lr", "learning_rate", "lr"), "lr")]),
    ("Throughput", "tokens/s", [(("perf/input_tokens_per_s", "tokens_per_s"), "input tokens/s"),
                                (("perf/label_tokens_per_s",), "label tokens/s")]),
]


def read_metrics(metrics_jsonl: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series per metric name, as (step, value) sorted by step, from a metrics JSONL file. Event
    records are skipped, null values dropped, and a step that goes back (a resume from an earlier
    checkpoint) discards every point at or after it. Unparsable lines (a crash mid-write) are skipped."""
    series: dict[str, dict[int, float]] = {}
    last_step = None
    with open(metrics_jsonl, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: not JSON, skipped", metrics_jsonl, lineno)
                continue
            if not isinstance(rec, dict) or "event" in rec or not isinstance(rec.get("step"), int):
                continue
            step = rec["step"]
            if last_step is not None and step < last_step:  # a resume rewound the run to `step`
                for points in series.values():
                    for s in [s for s in points if s >= step]:
                        del points[s]
            last_step = step
            for k, v in rec.items():
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                series.setdefault(k, {})[step] = float(v)
    return {k: sorted(points.items()) for k, points in series.items() if points}


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    return p / "metrics.jsonl" if p.is_dir() else p


def plot_run(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Draw the loss, learning-rate and throughput curves of a run into `out_png` (written atomically).
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training curves plotted (pip install matplotlib)")
        return None
    series = read_metrics(_resolve(metrics_jsonl))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), constrained_layout=True)
    for ax, (title, ylabel, lines) in zip(axes, PANELS, strict=True):
        drawn = False
        for aliases, label in lines:
            name = next((a for a in aliases if a in series), None)
            if name is None:
                continue
            steps, values = zip(*series[name], strict=True)
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distsft.plots", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run's output directory, or its metrics.jsonl")
    parser.add_argument("-o", "--out", help=f"PNG to write (default: {DEFAULT_PNG} beside the log)")
    args = parser.parse_args(argv)
    src = _resolve(args.run)
    if not src.is_file():
        print(f"error: no metrics log at {src}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src.parent / DEFAULT_PNG
    written = plot_run(src, out)
    if written is None:
        print("error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 1
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
