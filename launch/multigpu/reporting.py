"""Reporting for launch/bench_multigpu.py: provenance of a call, number formatting and markdown tables, the
output files (FILE.md, rewritten after every launch so that a call killed at its time limit still leaves what
it measured, and FILE.json with the raw numbers), and `report`, which merges the JSON of several calls."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import NO_MULTICAST, PHASES, REPO


def run_quiet(cmd: list[str], **kw) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(b) -> dict:
    """GPUs, driver, versions, commit, date, command, data, work directory of the call `b` (a Bench)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "deepspeed", "triton", "distsft"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    with contextlib.suppress(Exception):
        import torch

        versions["torch"] = torch.__version__
        versions["cuda"] = torch.version.cuda
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    gpus = []
    if not b.cpu:
        out = run_quiet(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                         "--format=csv,noheader"])
        gpus = [line.strip() for line in out.splitlines() if line.strip()]
    commit = b.args.commit or run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "device": "CPU (gloo, DS_ACCELERATOR=cpu)" if b.cpu else (
            gpus[0].split(",")[1].strip() if gpus else "?"),
        "gpus": gpus, "visible_devices": b.visible, "versions": versions,
        "commit": commit + (" (given with --commit)" if b.args.commit else (" + uncommitted changes"
                                                                           if dirty else "")),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "data": b.data, "workdir": str(b.work), "env": NO_MULTICAST,
    }


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.{digits}g}" if abs(x) < 100 else f"{x:.1f}"
        return f"{x:.{digits}g}"
    return str(x)


def loss_fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """What one call measured: per phase its numbers and markdown table, notes, the provenance."""

    def __init__(self, out: str | None, provenance: dict, t0: float):
        self.out, self.provenance, self.t0 = out, provenance, t0
        self.results: dict[str, Any] = {}
        self.tables: dict[str, str] = {}
        self.notes: list[str] = []

    def record(self, phase: str, result: dict, markdown: str, launches: dict) -> None:
        self.results[phase] = result
        self.tables[phase] = markdown
        print(f"\n{markdown}\n", flush=True)
        self.save(launches)

    def payload(self, launches: dict) -> dict:
        return {"provenance": {**self.provenance, "elapsed_s": time.monotonic() - self.t0,
                               "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")},
                "notes": self.notes, "results": self.results, "tables": self.tables,
                "launches": {k: v.summary() for k, v in launches.items()}}

    def save(self, launches: dict) -> None:
        if not self.out:
            return
        out = Path(self.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = self.payload(launches)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out.with_suffix(".json"))
        out.write_text(render(payload))


def render(payload: dict, heading: str | None = "# distsft multi-GPU benchmark (issue 8)") -> str:
    p = payload["provenance"]
    v = p.get("versions", {})
    lines = [heading, ""] if heading else []
    lines += [
        f"Provenance: {p['device']}" + (f" x {p['visible_devices']}" if p.get("gpus") else "")
        + (f" ({'; '.join(p['gpus'])})" if p.get("gpus") else "") + f"; host {p['host']}, {p['cpus']} CPUs; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; Python {p['python']}; commit {p['commit']}; "
        f"{p['date_utc']} to {p.get('finished_utc', '?')} ({fmt(p.get('elapsed_s'))} s); data {p['data']}; child "
        "env " + " ".join(f"{k}={val}" for k, val in p["env"].items()) + ".",
        "",
        f"    {p['command']}",
        "",
    ]
    for note in payload.get("notes", []):
        lines.append(f"- {note}")
    if payload.get("notes"):
        lines.append("")
    for phase in PHASES:
        if phase in payload.get("tables", {}):
            lines += [payload["tables"][phase], ""]
    pre = payload.get("results", {}).get("prebuild")
    if pre:
        lines += ["Random-weight models drawn once and loaded by every launch (`model.name_or_path`):", ""]
        lines += [f"- {k}: {fmt(x.get('params'))} parameters, drawn in {fmt(x.get('draw_s'))} s, saved in "
                  f"{fmt(x.get('save_s'))} s: `{x['command']}`" for k, x in pre.items()]
        lines.append("")
    lines += ["Commands (every launch, in order):", ""]
    for name, launch in payload.get("launches", {}).items():
        status = ("skipped: " + launch["skipped"]) if launch.get("skipped") else (
            "timed out" if launch.get("timed_out") else
            "interrupted" if launch.get("rc") is None else f"exit {launch.get('rc')}")
        lines.append(f"- {name} ({status}, {fmt(launch.get('wall_s'))} s):")
        lines += [f"  `{c}`" for c in launch.get("commands", [])]
    return "\n".join(lines) + "\n"


def report(files: list[str], out: str | None) -> None:
    parts = ["# distsft multi-GPU benchmark (issue 8)", ""]
    for i, f in enumerate(files, 1):
        payload = json.loads(Path(f).read_text())
        parts.append(render(payload, heading=f"## Call {i}: {Path(f).name}"))
    text = "\n".join(parts)
    if out:
        Path(out).write_text(text)
    print(text)
