"""Multi-GPU benchmark set of issue 8: scaling, ZeRO-3 at 70B, loss parity, resume across world sizes,
two agents on one host, SIGTERM at scale. Every number comes from real `distsft/train.py` launches.

    python launch/bench_multigpu.py all --out /tmp/mg.md                 # every phase, GPUs 1,2,4,8
    python launch/bench_multigpu.py scaling --modes ddp --out /tmp/a.md   # one phase (or several)
    python launch/bench_multigpu.py all --cpu --gpus 1,2 --out /tmp/c.md  # the same code paths on CPU
    python launch/bench_multigpu.py report a.json b.json --out launch/results/multigpu_h200x8.md

Phases (names or numbers; `all` = 1-6, run in this order: scaling, zero3, parity, resume, nodes, sigterm):

  1 scaling  weak scaling: for N in --gpus and each of --modes (ddp, zero2), a constant per-GPU batch
             (--micro x --seq) of the --shape model, --warmup + --steps optimizer steps. Tokens/s per GPU
             is the median of `perf/input_tokens_per_s_per_gpu` over the steps after the warm-up (the
             trainer's metrics.jsonl, one record per step); efficiency = that / the N=1 value of the mode
             (also given from the median step time, which does not depend on packing fill).
  2 zero3    ZeRO-3 with the --big-shape model (llama3-70b) built partitioned (model.zero_init=true), on
             all N GPUs: tokens/s, MFU, peak allocated memory (rank 0, the trainer's) and the peak memory
             in use on every GPU (nvidia-smi, polled); the LoRA checkpoint saved at the last step: seconds
             and size (goal: < 5 s).
  3 parity   loss parity on real data (--data): 1 GPU vs N GPUs DDP vs N GPUs ZeRO-3 with the same global
             batch G = N x micro (gradient_accumulation_steps = G / (micro x world)), same weights (the
             same saved random init everywhere, model.zero_init=false), constant learning rate. Per-step
             `train/loss` and `data/last_step_digest` (the samples of the step) against the 1-GPU run:
             max |diff| and pass/fail at --atol.
  4 resume   the N-GPU DDP run of phase 3 is the uninterrupted run and saves every k steps; its step-k
             checkpoint resumes on N/2 GPUs for k steps, whose checkpoint resumes on N/4, ... 1, then
             ZeRO-3 on N, global batch constant throughout (accumulation adjusted; no
             allow_global_batch_change). Per resume: the losses after it against the uninterrupted run,
             time to save the checkpoint (`checkpoint/save_s`, committed, on the world that wrote it) and
             to load it (timed around the trainer's own `find_resume_checkpoint` / `load_checkpoint` by a
             thin wrapper, `_trainer` below; max over ranks), the loss curve side by side.
  5 nodes    two torchrun agents of N/2 processes each through launch/multinode.sh (NNODES=2, one host,
             MASTER_ADDR=127.0.0.1, each agent its own CUDA_VISIBLE_DEVICES half), the phase-3 config;
             losses against the single-agent N-GPU run when phase 3 ran in the same call.
  6 sigterm  an N-GPU DDP run of the --sigterm-shape model (default --shape), no periodic checkpoints; after
             --sigterm-after steps SIGTERM goes to the torchrun agent (`agent`, which forwards it and gives
             the workers 30 s) and/or to every rank (`ranks`, as Slurm does) (--sigterm-targets). Measured
             from the signal: the checkpoint directory's commit (its rename, polled every 5 ms) and the
             agent's exit; checked: exit code 75 (every rank's own, recorded by the `_trainer` wrapper; the
             status file of DISTSFT_STATUS_FILE; what torchrun prints), one committed checkpoint that
             verifies. Goal: < 10 s to exit.

GPU runs: bf16, the trainer's defaults (kernels, varlen attention), `model.tokenizer=builtin:tiny-llama`,
random weights of the shapes in launch/shapes/ (speed does not depend on them). Unless --no-prebuild, each
model of phases 1, 3-6 is drawn once on GPU 0 (a subprocess), saved, and every launch loads it with
`model.name_or_path` (random init on the CPU costs ~100 s per launch at 8B; loading takes seconds);
the 70B of phase 2 is built by the trainer itself under deepspeed.zero.Init (`model.init_from_config`).
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set here and in every
child. --cpu: DS_ACCELERATOR=cpu, gloo, a 2-layer Llama (the test suite's tiny model) and the demo's
4-layer one for phase 2, fp32, eager attention, torch kernels, 1..3 processes: what CI runs
(tests/integration/test_bench_multigpu.py).

On the lent machines (nvidia-h200-x8; x4/x2 take the same commands, --gpus is capped at what is visible):
here, once: `bash ../shared/device/wheelhouse.sh && cp ../shared/data/gsm8k_train_alpaca.json .whl/`
(../shared does not travel; .whl/ does, with `carry: [".whl"]`). Then three calls, each beginning with
the wheelhouse line of ../shared/device/README.md plus `ln -sfn $PWD/kernels /tmp/site/distsft_kernels;`,
all with `--data .whl/gsm8k_train_alpaca.json --workdir /tmp/mg --commit <sha here> --deadline-s 520`
(the same --workdir lets a call that finds the machine still warm reuse the drawn models and the data
cache) and their own `--out $OUT/<name>.md --logs $OUT/<name>-logs.tar.gz`:

    python3 launch/bench_multigpu.py scaling ...                # 8 launches of the 8B shape
    python3 launch/bench_multigpu.py parity resume nodes ...    # 8 launches of the 1B shape
    python3 launch/bench_multigpu.py zero3 sigterm ...          # the 70B, then 2 launches of the 8B shape

then, here, `python launch/bench_multigpu.py report scaling.json parity.json zero3.json --out FILE.md`.
A call that ran out of time says which launches it skipped: run those phases (or `scaling --modes zero2`)
again in another call.

Output: each phase prints its markdown table when it ends; --out FILE.md gets every table plus provenance
(GPU, driver, versions, commit, date, every exact command) and FILE.json the raw numbers, both rewritten
after every launch, so a call killed at its time limit still leaves what it measured. --deadline-s stops
starting launches that would not finish in time. `report` merges the JSON of several calls into one file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "distsft" / "train.py"
SELF = Path(__file__).resolve()
SHAPES = REPO / "launch" / "shapes"
PHASES = ("scaling", "zero3", "parity", "resume", "nodes", "sigterm")
# NVLink multicast can take a shared host's GPUs out of service: off in every process we start.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
REQUEUE_EXIT_CODE = 75  # distsft.distributed.REQUEUE_EXIT_CODE (not imported: the parent stays light)
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
T0 = time.monotonic()  # --deadline-s counts from here
TINY_LAYERS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)  # tests/_support.write_tiny_llama


# ----------------------------------------------------------------------------------------------------
# Worker entry points (run by torchrun / as subprocesses, never by hand)


def trainer_entry(argv: list[str]) -> None:
    """`distsft/train.py`'s command line, plus the time each rank spends in the trainer's own
    `find_resume_checkpoint` (rank 0: choosing and verifying) and `load_checkpoint` (every rank: verify,
    read every shard, reassemble, apply), and the exit code each rank leaves with, appended to
    `<output_dir>/bench_timing.rank<R>.jsonl`. The loop is untouched: the two functions are looked up in
    distsft.train's globals at call time."""
    here = SELF.parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import importlib.util

    if importlib.util.find_spec("distsft") is None:
        sys.path.append(str(REPO))
    from distsft.cli import exit_cleanly, parse_args, run

    cfg = parse_args(argv)
    import distsft.train  # noqa: F401

    trainer = sys.modules["distsft.train"]
    rank = int(os.environ.get("RANK", "0"))
    timing = Path(cfg.train.output_dir) / f"bench_timing.rank{rank:03d}.jsonl"

    def note(what: str, **fields) -> None:
        timing.parent.mkdir(parents=True, exist_ok=True)
        with open(timing, "a") as f:
            f.write(json.dumps({"what": what, "rank": rank, **fields}, default=str) + "\n")

    find, load = trainer.find_resume_checkpoint, trainer.load_checkpoint

    def timed_find(output_dir, spec):
        t0 = time.perf_counter()
        found = find(output_dir, spec)
        if found is not None:
            note("find_verify", seconds=time.perf_counter() - t0, path=found)
        return found

    def timed_load(path, **kw):
        t0 = time.perf_counter()
        state = load(path, **kw)
        note("load", seconds=time.perf_counter() - t0, path=path)
        return state

    trainer.find_resume_checkpoint, trainer.load_checkpoint = timed_find, timed_load
    try:
        run(cfg)
    except SystemExit as e:  # 75 after a preemption, 65 diverged
        note("exit", code=e.code, time=time.time())
        raise
    except BaseException as e:
        note("exit", code=f"{type(e).__name__}: {e}", time=time.time())
        raise
    note("exit", code=0, time=time.time())
    exit_cleanly()


def prebuild_entry(shape: str, out: str, dtype: str, seed: int, device: str) -> None:
    """Draw a random-initialised model of `shape` (a config directory) on `device` and save it in HF
    format: the launches then load it (`model.name_or_path`) instead of drawing 8B weights on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    cfg = AutoConfig.from_pretrained(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    t1 = time.perf_counter()
    staging = Path(out + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    os.replace(staging, out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n, "draw_s": t1 - t0, "save_s": time.perf_counter() - t1}))


# ----------------------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_map() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (Linux)."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        out.setdefault(ppid, []).append(int(d.name))
    return out


def descendants(pid: int) -> list[int]:
    kids, todo, out = children_map(), [pid], []
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything below it (torchrun starts each worker in its own
    session, so a process-group kill would miss them)."""
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def read_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            recs.append(json.loads(line))
    return recs


def series(records: list[dict], key: str) -> dict[int, float]:
    """step -> value of `key`; a later record of the same step wins (resumes append, see tracking.py)."""
    return {r["step"]: r[key] for r in records if key in r and r.get(key) is not None and "event" not in r}


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


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


def run_quiet(cmd: list[str], **kw) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class GpuMemPoller:
    """Peak memory in use per GPU (MiB, nvidia-smi: allocator reserve + CUDA context) while a launch runs."""

    def __init__(self, enabled: bool, interval: float = 0.5):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self):
        while not self._stop.is_set():
            out = run_quiet(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"])
            for line in out.splitlines():
                with contextlib.suppress(ValueError):
                    i, used = (int(x) for x in line.split(","))
                    self.peak[i] = max(self.peak.get(i, 0), used)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# ----------------------------------------------------------------------------------------------------
# One training launch


@dataclass
class Launch:
    name: str
    world: int
    mode: str  # ddp (plain data parallel; one process = no wrapper), zero2, zero3
    out: Path
    commands: list[str] = field(default_factory=list)
    rc: int | None = None  # the launcher's exit status (torchrun agent, or each agent for nodes)
    rcs: list[int | None] = field(default_factory=list)
    wall_s: float | None = None
    started: float | None = None  # epoch seconds
    timed_out: bool = False
    skipped: str | None = None
    error: str | None = None
    log: Path | None = None
    gpu_peak_mib: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.timed_out and self.rc == 0

    def records(self) -> list[dict]:
        return read_records(self.out)

    def losses(self) -> dict[int, float]:
        return series(self.records(), "train/loss")

    def digests(self) -> dict[int, float]:
        return series(self.records(), "data/last_step_digest")

    def startup_s(self) -> float | None:
        """Launch to the first optimizer step's record (imports, model, data, DeepSpeed, NCCL, step 1)."""
        first = [r["time"] for r in self.records() if "train/loss" in r]
        return first[0] - self.started if first and self.started else None

    def status(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        if self.timed_out:
            return "timed out"
        if self.rc is None:
            return "interrupted"
        return "ok" if self.rc == 0 else f"exit {self.rc}"

    def summary(self) -> dict:
        return {"name": self.name, "world": self.world, "mode": self.mode, "out": str(self.out), "rc": self.rc,
                "rcs": self.rcs, "wall_s": self.wall_s, "timed_out": self.timed_out, "skipped": self.skipped,
                "error": self.error, "commands": self.commands, "startup_s": self.startup_s(),
                "gpu_peak_mib": self.gpu_peak_mib}


# ----------------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = T0
        self.cpu = args.cpu
        self.visible = self._visible_devices()
        self.work = Path(args.workdir or f"/tmp/distsft-bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.launches: dict[str, Launch] = {}
        self.sigterm_results: dict[str, dict] = {}
        self.results: dict[str, Any] = {}
        self.tables: dict[str, str] = {}
        self.notes: list[str] = []
        self.gpus = sorted({g for g in args.gpus if 1 <= g <= self.visible}) or [1]
        if dropped := sorted(set(args.gpus) - set(self.gpus)):
            self.notes.append(f"--gpus {','.join(map(str, dropped))} dropped: {self.visible} visible")
        self.n = max(self.gpus)
        self.data = self._data()
        self.models: dict[str, str] = {}  # shape key -> model override (init_from_config or name_or_path)
        self.provenance = self._provenance()

    # -- environment ---------------------------------------------------------------------------

    def _visible_devices(self) -> int:
        if self.cpu:
            return 3
        import torch  # device_count does not create a CUDA context in this process

        n = torch.cuda.device_count()
        if n == 0:
            raise SystemExit("bench_multigpu: no CUDA device visible; pass --cpu to run the CPU version")
        return n

    def env(self, world: int, extra: dict | None = None) -> dict[str, str]:
        env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
        # multinode.sh calls `torchrun`: the one next to this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        if self.cpu:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        else:
            if env.get("DS_ACCELERATOR") == "cpu":
                del env["DS_ACCELERATOR"]
            # torchrun would set 1 thread per worker; the CPU side (data, optimizer bookkeeping) gets a share.
            env.setdefault("OMP_NUM_THREADS", str(max(1, min(16, (os.cpu_count() or 1) // max(world, 1)))))
        env.update(extra or {})
        return env

    def _data(self) -> str:
        path = Path(self.args.data) if self.args.data else DEFAULT_DATA
        if not path.is_file():
            self.notes.append(f"data: {path} not found; the embedded demo rows (builtin:gsm8k-demo, 400 GSM8K "
                              "rows) instead")
            return "builtin:gsm8k-demo"
        if self.args.data_rows:
            rows = json.loads(path.read_text())[: self.args.data_rows]
            sub = self.work / f"data-{self.args.data_rows}.json"
            sub.write_text(json.dumps(rows))
            self.notes.append(f"data: the first {len(rows)} rows of {path}")
            return str(sub)
        return str(path.resolve())

    def _provenance(self) -> dict:
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
        if not self.cpu:
            out = run_quiet(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                             "--format=csv,noheader"])
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
        commit = self.args.commit or run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
        dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
        return {
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "device": "CPU (gloo, DS_ACCELERATOR=cpu)" if self.cpu else (
                gpus[0].split(",")[1].strip() if gpus else "?"),
            "gpus": gpus, "visible_devices": self.visible, "versions": versions,
            "commit": commit + (" (given with --commit)" if self.args.commit else (" + uncommitted changes"
                                                                               if dirty else "")),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "data": self.data, "workdir": str(self.work), "env": NO_MULTICAST,
        }

    # -- time ----------------------------------------------------------------------------------

    def remaining(self) -> float:
        if self.args.deadline_s is None:
            return float("inf")
        return self.args.deadline_s - (time.monotonic() - self.t0)

    stopping = False  # set by a SIGTERM/SIGINT to this process: every launch not yet started is skipped

    def skip_reason(self) -> str:
        return "stopped" if Bench.stopping else "deadline"

    def launch_timeout(self) -> float | None:
        """None: no time left for one more launch (the caller records it as skipped)."""
        if Bench.stopping:
            return None
        left = self.remaining() - 5
        if left < self.args.min_launch_s:
            return None
        return min(self.args.launch_timeout_s, left)

    # -- models --------------------------------------------------------------------------------

    def model(self, which: str) -> dict[str, Any]:
        """Overrides naming the model of `which` (shape, big, loss)."""
        if self.cpu:
            if which == "big":  # the demo's 4-layer Llama, built by the trainer (zero_init path)
                return {"model.init_from_config": "builtin:tiny-llama"}
            key = "tiny"
            if key not in self.models:
                base = json.loads((REPO / "distsft" / "assets" / "tiny-llama" / "config.json").read_text())
                base.update(TINY_LAYERS)
                d = self.work / "models" / "tiny-config"
                d.mkdir(parents=True, exist_ok=True)
                (d / "config.json").write_text(json.dumps(base))
                self.models[key] = str(d)
            src = self.models[key]
        else:
            name = {"shape": self.args.shape, "big": self.args.big_shape, "loss": self.args.loss_shape,
                    "sigterm": self.args.sigterm_shape or self.args.shape}[which]
            src = str(SHAPES / name) if (SHAPES / name).is_dir() else name
            if which == "big":
                return {"model.init_from_config": src}
        if not self.args.prebuild or self.launch_timeout() is None:  # (no time left: the launch is skipped)
            return {"model.init_from_config": src}
        key = f"{Path(src).name}-{self.dtype}"
        if key not in self.models:
            self.models[key] = self._prebuild(src, key)
        if self.models[key].startswith("init:"):
            return {"model.init_from_config": src}
        return {"model.name_or_path": self.models[key]}

    @property
    def dtype(self) -> str:
        return "float32" if self.cpu else "bfloat16"

    def _prebuild(self, src: str, key: str) -> str:
        out = self.work / "models" / key
        if (out / "config.json").is_file():
            return str(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(SELF), "_prebuild", src, str(out), self.dtype, str(self.args.seed),
               "cpu" if self.cpu else "cuda:0"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env(1), cwd=self.work,
                              timeout=max(60, min(900, self.remaining())))
        info = {"command": shlex.join(cmd), "rc": proc.returncode, "wall_s": time.monotonic() - t0}
        if proc.returncode != 0:
            self.notes.append(f"prebuild of {src} failed (exit {proc.returncode}); its launches draw the weights "
                              f"themselves (model.init_from_config): {proc.stderr.strip()[-300:]}")
            self.models[key] = "init:"
            return "init:"
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        self.results.setdefault("prebuild", {})[key] = info
        print(f"[bench] prebuilt {key}: {info['params']:,} parameters, drawn in {info['draw_s']:.1f}s, saved in "
              f"{info['save_s']:.1f}s", flush=True)
        return str(out)

    # -- run configuration ---------------------------------------------------------------------

    def overrides(self, out: Path, world: int, mode: str, *, which: str, micro: int, accum: int, steps: int,
                  seq: int, save_steps: int = 0, extra: dict | None = None) -> list[str]:
        o: dict[str, Any] = {
            **self.model(which),
            "model.tokenizer": "builtin:tiny-llama",
            "model.dtype": self.dtype,
            "model.gradient_checkpointing": "false",
            "data.sources": json.dumps([{"path": self.data}]),
            "data.max_seq_len": seq,
            "data.cache_dir": str(self.work / "cache"),
            "data.progress_bar": "false",
            "train.per_device_train_batch_size": micro,
            "train.gradient_accumulation_steps": accum,
            "train.max_steps": steps,
            "train.learning_rate": self.args.lr,
            "train.lr_scheduler_type": "constant",
            "train.seed": self.args.seed,
            "train.output_dir": str(out),
            "checkpoint.save_steps": save_steps,
            "checkpoint.save_total_limit": 1000,
            "logging.logging_steps": 1,
            "logging.progress_bar": "false",
        }
        if self.cpu:
            o.update({"model.attn_implementation": "eager", "kernels.backend": "torch", "lora.r": 8})
        if mode in ("zero2", "zero3"):
            o["distributed.deepspeed_config"] = str(REPO / "ds_configs" / f"{mode}.json")
        if mode == "zero2":  # DeepSpeed's ZeRO-2 engine, measured as such (auto would run a LoRA job as DDP)
            o["distributed.zero12"] = "deepspeed"
        o.update(extra or {})
        return [f"{k}={v}" for k, v in o.items()]

    def torchrun(self, world: int, script_args: list[str], timed: bool = False) -> list[str]:
        entry = [str(SELF), "_trainer"] if timed else [str(TRAIN)]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                *entry, *script_args]

    # -- launching -----------------------------------------------------------------------------

    live: set = set()  # Popen objects running now (killed with their workers if this process is stopped)

    def spawn(self, cmd: list[str], *, env: dict, stdout) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=self.work, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        Bench.live.add(proc)
        return proc

    @staticmethod
    def reaped(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
        Bench.live.discard(proc)

    def run(self, name: str, world: int, mode: str, overrides: list[str], *, timed: bool = False,
            env: dict | None = None, prepare=None) -> Launch:
        """One torchrun launch, waited for (cached by name: phases share runs)."""
        if name in self.launches:
            return self.launches[name]
        launch = Launch(name, world, mode, Path(overrides_value(overrides, "train.output_dir")))
        self.launches[name] = launch
        timeout = self.launch_timeout()
        if timeout is None:
            launch.skipped = self.skip_reason()
            self.save()
            return launch
        shutil.rmtree(launch.out, ignore_errors=True)  # a --workdir reused from an earlier call: start clean
        if prepare is not None:
            prepare(launch.out)
        cmd = self.torchrun(world, overrides, timed=timed)
        launch.commands.append(shlex.join(cmd))
        launch.log = self.work / "logs" / f"{name}.log"
        print(f"[bench] {name}: {world} x {mode} ...", flush=True)
        with open(launch.log, "w") as logf, GpuMemPoller(not self.cpu) as poll:
            logf.write("$ " + shlex.join(cmd) + "\n")
            logf.flush()
            launch.started, t0 = time.time(), time.monotonic()
            proc = self.spawn(cmd, env=self.env(world, env), stdout=logf)
            try:
                launch.rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                launch.timed_out = True
            finally:
                self.reaped(proc)
            launch.wall_s = time.monotonic() - t0
        launch.rcs = [launch.rc]
        launch.gpu_peak_mib = dict(poll.peak)
        self._after(launch)
        return launch

    def _after(self, launch: Launch) -> None:
        if not launch.ok:
            tail = launch.log.read_text()[-3000:] if launch.log and launch.log.is_file() else ""
            launch.error = tail
            print(f"[bench] {launch.name}: {launch.status()} after {launch.wall_s:.0f}s; log tail:\n{tail}",
                  flush=True)
        else:
            print(f"[bench] {launch.name}: ok in {launch.wall_s:.0f}s (first step after "
                  f"{fmt(launch.startup_s())}s)", flush=True)
        self.save()

    # -- output --------------------------------------------------------------------------------

    def record(self, phase: str, result: dict, markdown: str) -> None:
        self.results[phase] = result
        self.tables[phase] = markdown
        print(f"\n{markdown}\n", flush=True)
        self.save()

    def payload(self) -> dict:
        return {"provenance": {**self.provenance, "elapsed_s": time.monotonic() - self.t0,
                               "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")},
                "notes": self.notes, "results": self.results, "tables": self.tables,
                "launches": {k: v.summary() for k, v in self.launches.items()}}

    def save(self) -> None:
        if not self.args.out:
            return
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = self.payload()
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out.with_suffix(".json"))
        out.write_text(render(payload))


def overrides_value(overrides: list[str], key: str) -> str:
    for o in overrides:
        if o.startswith(key + "="):
            return o.split("=", 1)[1]
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------------
# Phase 1: weak scaling


def phase_scaling(b: Bench) -> None:
    a = b.args
    rows, res = [], {}
    for mode in a.modes:
        base = None
        for n in b.gpus:
            name = f"scaling_{mode}_{n}"
            steps = a.warmup + a.steps
            ov = b.overrides(b.work / name, n, mode, which="shape", micro=a.micro, accum=1, steps=steps, seq=a.seq)
            launch = b.run(name, n, mode, ov)
            recs = [r for r in launch.records() if "train/loss" in r and r["step"] > a.warmup]
            tps = median([r.get("perf/input_tokens_per_s_per_gpu") for r in recs])
            step_s = median([r.get("perf/step_time_s") for r in recs])
            mfu = median([r.get("perf/mfu") for r in recs])
            peak = max([r["mem/peak_allocated_gib"] for r in recs if r.get("mem/peak_allocated_gib")], default=None)
            smi = max(launch.gpu_peak_mib.values()) / 1024 if launch.gpu_peak_mib else None
            entry = {"gpus": n, "mode": mode, "tokens_per_s_per_gpu": tps, "step_time_s": step_s, "mfu": mfu,
                     "peak_allocated_gib_rank0": peak, "peak_used_gib_max_gpu": smi, "measured_steps": len(recs),
                     "startup_s": launch.startup_s(), "wall_s": launch.wall_s, "status": launch.status()}
            if n == 1 and tps:
                base = entry
            if base and tps and step_s:
                entry["efficiency"] = tps / base["tokens_per_s_per_gpu"]
                entry["efficiency_step_time"] = base["step_time_s"] / step_s
            res[f"{mode}_{n}"] = entry
            rows.append([mode, n, f"{a.micro} x {a.seq}", tps, step_s, pct(entry.get("efficiency")),
                         pct(entry.get("efficiency_step_time")), pct(mfu), peak, smi, len(recs),
                         launch.startup_s(), launch.wall_s, launch.status()])
    goal = []
    for mode in a.modes:
        top = res.get(f"{mode}_{b.n}", {})
        if b.n > 1 and top.get("efficiency") is not None:
            met = top["efficiency"] >= 0.95
            res[f"goal_{mode}"] = {"gpus": b.n, "efficiency": top["efficiency"], "met": met}
            goal.append(f"{mode} at {b.n} GPUs {pct(top['efficiency'])}: {'met' if met else 'not met'}")
    shape = "tiny 2-layer Llama (CPU)" if b.cpu else a.shape
    footer = f"\n\nGoal, >= 95% efficiency at the largest world: {'; '.join(goal)}." if goal else ""
    md = (f"### 1. Weak scaling: {shape}, LoRA, constant per-GPU batch, median of steps {a.warmup + 1}-"
          f"{a.warmup + a.steps}\n\n" + table(
              ["mode", "GPUs", "per-GPU batch", "input tokens/s per GPU", "step s", "scaling efficiency",
               "efficiency (step time)", "MFU", "peak alloc GiB (rank 0)", "peak used GiB (max GPU)", "steps",
               "first step after s", "wall s", "status"], rows) + footer)
    b.record("scaling", res, md)


# ----------------------------------------------------------------------------------------------------
# Phase 2: ZeRO-3, big shape, partitioned init


def phase_zero3(b: Bench) -> None:
    a = b.args
    n, steps = b.n, a.big_warmup + a.big_steps
    name = f"zero3_big_{n}"
    ov = b.overrides(b.work / name, n, "zero3", which="big", micro=a.big_micro, accum=1, steps=steps, seq=a.seq,
                     save_steps=steps, extra={"model.zero_init": "true", "model.gradient_checkpointing": a.big_gc})
    launch = b.run(name, n, "zero3", ov)
    recs = launch.records()
    train = [r for r in recs if "train/loss" in r and r["step"] > a.big_warmup]
    tps = median([r.get("perf/input_tokens_per_s") for r in train])
    tps_gpu = median([r.get("perf/input_tokens_per_s_per_gpu") for r in train])
    mfu = median([r.get("perf/mfu") for r in train])
    tflops = median([r.get("perf/tflops_per_gpu") for r in train])
    peak = max([r["mem/peak_allocated_gib"] for r in train if r.get("mem/peak_allocated_gib")], default=None)
    saved = save_info(launch, steps)
    save_s, save_mb, save_wall = saved["save_s"], saved["mb"], saved["wall_s"]
    per_gpu = {i: round(v / 1024, 1) for i, v in sorted(launch.gpu_peak_mib.items())}
    res = {"shape": "builtin:tiny-llama" if b.cpu else a.big_shape, "gpus": n, "tokens_per_s": tps,
           "tokens_per_s_per_gpu": tps_gpu, "mfu": mfu, "tflops_per_gpu": tflops, "peak_allocated_gib_rank0": peak,
           "peak_used_gib_per_gpu": per_gpu, "checkpoint_save_s": save_s, "checkpoint_mb": save_mb,
           "checkpoint_save_wall_s": save_wall,
           "save_goal_met": None if save_wall is None else save_wall < 5.0, "startup_s": launch.startup_s(),
           "wall_s": launch.wall_s, "status": launch.status(), "measured_steps": len(train)}
    shape = "demo 4-layer Llama (CPU)" if b.cpu else a.big_shape
    rows = [[shape, n, f"{a.big_micro} x {a.seq}", str(a.big_gc), tps, tps_gpu, pct(mfu), tflops, peak,
             ", ".join(f"{v:g}" for v in per_gpu.values()), save_s, save_wall, save_mb, res["save_goal_met"],
             launch.startup_s(), launch.wall_s, launch.status()]]
    md = (f"### 2. ZeRO-3, {shape}, random weights initialised partitioned (model.zero_init=true), "
          f"median of steps {a.big_warmup + 1}-{steps}\n\n" + table(
              ["shape", "GPUs", "per-GPU batch", "recompute", "input tokens/s", "per GPU",
               "MFU (recomputation not counted)", "TFLOP/s per GPU",
               "peak alloc GiB (rank 0)", "peak used GiB per GPU (nvidia-smi)", "LoRA checkpoint save s",
               "save incl. adapter export s", "checkpoint MB", "save < 5 s", "first step after s", "wall s",
               "status"], rows))
    b.record("zero3", res, md)


# ----------------------------------------------------------------------------------------------------
# Phases 3 and 4: loss parity and the resume chain share their runs


def chain_worlds(n: int) -> list[int]:
    """N/2, N/4, ..., 1 (the worlds the N-GPU checkpoint resumes on in turn), only those dividing N."""
    out, w = [], n // 2
    while w >= 1:
        if n % w == 0 and w not in out:
            out.append(w)
        w //= 2
    if n > 1 and 1 not in out:
        out.append(1)
    return out


def loss_plan(b: Bench) -> dict:
    a, n = b.args, b.n
    worlds = chain_worlds(n)
    k = a.chain_k
    total = k * (len(worlds) + 2)  # the N-GPU segment, one per world, ZeRO-3 on N
    return {"n": n, "k": k, "worlds": worlds, "steps": total, "global_batch": n * a.loss_micro}


def loss_run(b: Bench, world: int, mode: str, name: str, steps: int, *, timed: bool = False,
             extra: dict | None = None, prepare=None) -> Launch:
    a, plan = b.args, loss_plan(b)
    accum = plan["global_batch"] // (a.loss_micro * world)
    ex = {"model.zero_init": "false", **(extra or {})}  # the same weights in every mode
    ov = b.overrides(b.work / name, world, mode, which="loss", micro=a.loss_micro, accum=accum, steps=steps,
                     seq=a.seq, save_steps=plan["k"], extra=ex)
    return b.run(name, world, mode, ov, timed=timed, prepare=prepare)


def compare(ref: Launch, run: Launch, steps) -> dict:
    lr, lo, dr, do = ref.losses(), run.losses(), ref.digests(), run.digests()
    steps = [s for s in steps if s in lr and s in lo]
    diffs = {s: abs(lr[s] - lo[s]) for s in steps}
    return {"steps": steps, "max_abs_diff": max(diffs.values()) if diffs else None,
            "first_step_diff": diffs[steps[0]] if steps else None,
            "same_samples": bool(steps) and all(dr.get(s) == do.get(s) for s in steps),
            "final_loss": lo[steps[-1]] if steps else None}


def phase_parity(b: Bench) -> None:
    a, plan = b.args, loss_plan(b)
    n, steps = plan["n"], plan["steps"]
    runs = [("1 GPU", loss_run(b, 1, "ddp", "loss_single_1", steps)),
            (f"{n} GPUs DDP", loss_run(b, n, "ddp", f"loss_ddp_{n}", steps)),
            (f"{n} GPUs ZeRO-3", loss_run(b, n, "zero3", f"loss_zero3_{n}", steps))]
    ref = runs[0][1]
    rows, res = [], {"global_batch": plan["global_batch"], "steps": steps, "atol": a.atol, "runs": {}}
    for label, run in runs:
        c = compare(ref, run, range(1, steps + 1))
        complete = len(c["steps"]) == steps
        passed = complete and c["same_samples"] and c["max_abs_diff"] is not None and c["max_abs_diff"] <= a.atol
        accum = plan["global_batch"] // (a.loss_micro * run.world)
        res["runs"][label] = {**c, "world": run.world, "mode": run.mode, "accum": accum, "passed": passed,
                              "status": run.status()}
        rows.append([label, f"{a.loss_micro} x {accum}", plan["global_batch"], len(c["steps"]), c["same_samples"],
                     c["first_step_diff"], c["max_abs_diff"], loss_fmt(c["final_loss"]), passed, run.status()])
    res["passed"] = all(r["passed"] for r in res["runs"].values())
    shape = "tiny 2-layer Llama, fp32 (CPU)" if b.cpu else f"{a.loss_shape}, bf16"
    md = (f"### 3. Loss parity on real data ({Path(b.data).name}, {shape}, {a.seq}-token packed slots, constant "
          f"lr {a.lr:g}): per-step loss against the 1-GPU run, same global batch\n\n" + table(
              ["run", "micro x accumulation", "global batch", "steps", "same samples every step",
               "step-1 |diff|", "max |diff| vs 1 GPU", "final loss", f"pass (<= {a.atol:g})", "status"], rows))
    b.record("parity", res, md)


def copy_checkpoint(src: Launch, step: int, dest: Path) -> None:
    target = dest / "checkpoints" / f"step-{step:08d}"
    if target.exists():
        return
    shutil.copytree(src.out / "checkpoints" / f"step-{step:08d}", target)


def save_info(launch: Launch, step: int) -> dict:
    """The trainer's `checkpoint/save_s` (save_checkpoint: shards, manifest, commit) and size at `step`, and
    the wall time between that step's metrics record and the checkpoint's, which adds the adapter export
    (a gather under ZeRO-3) done before save_checkpoint."""
    recs = launch.records()
    ck = [r for r in recs if r.get("step") == step and "checkpoint/save_s" in r]
    if not ck:
        return {"save_s": None, "mb": None, "wall_s": None}
    logged = [r for r in recs if r.get("step") == step and "train/loss" in r]
    wall = ck[-1]["time"] - logged[-1]["time"] if logged else None
    return {"save_s": ck[-1]["checkpoint/save_s"], "mb": ck[-1]["checkpoint/bytes"] / 1e6, "wall_s": wall}


def timing_events(launch: Launch, what: str) -> list[dict]:
    """What the `_trainer` wrapper recorded on every rank."""
    out = []
    for f in sorted(launch.out.glob("bench_timing.rank*.jsonl")):
        for line in f.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                if r.get("what") == what:
                    out.append(r)
    return out


def load_time(launch: Launch) -> tuple[float | None, float | None]:
    """(max over ranks of load_checkpoint seconds, rank 0's find+verify seconds)."""
    loads = [r["seconds"] for r in timing_events(launch, "load")]
    verify = [r["seconds"] for r in timing_events(launch, "find_verify")]
    return (max(loads) if loads else None), (verify[-1] if verify else None)


def phase_resume(b: Bench) -> None:
    a, plan = b.args, loss_plan(b)
    n, k, steps = plan["n"], plan["k"], plan["steps"]
    ref = loss_run(b, n, "ddp", f"loss_ddp_{n}", steps)  # phase 3's: saved every k steps
    segments = [(w, "ddp") for w in plan["worlds"]] + [(n, "zero3")]
    rows, curve_rows, res = [], [], {"k": k, "steps": steps, "atol": a.atol, "segments": []}
    prev, prev_label = ref, f"{n} x DDP"
    for i, (world, mode) in enumerate(segments, start=1):
        start, end = i * k, (i + 1) * k
        name = f"resume_{i}_{mode}_{world}"
        source = prev
        ok_source = source.ok and (source.out / "checkpoints" / f"step-{start:08d}").is_dir()
        if not ok_source:
            launch = Launch(name, world, mode, b.work / name, skipped=f"no step-{start} checkpoint from {source.name}")
            b.launches[name] = launch
        else:
            launch = loss_run(b, world, mode, name, end, timed=True,
                              extra={"checkpoint.resume_from_checkpoint": "auto"},
                              prepare=lambda out, s=source, st=start: copy_checkpoint(s, st, out))
        saved = save_info(source, start)
        save_s, mb = saved["save_s"], saved["mb"]
        load_s, verify_s = load_time(launch)
        c = compare(ref, launch, range(start + 1, end + 1))
        recs = launch.records()
        resumed = any(r.get("event") == "resumed" for r in recs)
        changed = [r for r in recs if r.get("event") == "world_size_changed"]
        passed = (launch.ok and resumed and len(c["steps"]) == k and c["same_samples"]
                  and c["max_abs_diff"] is not None and c["max_abs_diff"] <= a.atol)
        seg = {"segment": i, "saved_by": prev_label, "step": start, "save_s": save_s,
               "save_wall_s": saved["wall_s"], "checkpoint_mb": mb,
               "resumed_on": f"{world} x {mode}", "load_s": load_s, "verify_s": verify_s, "resumed": resumed,
               "world_size_changed": [(r["before"], r["after"]) for r in changed], **c, "passed": passed,
               "status": launch.status()}
        res["segments"].append(seg)
        rows.append([i, prev_label, start, save_s, saved["wall_s"], mb, f"{world} x {mode}", load_s, verify_s,
                     f"{start + 1}-{end}", c["same_samples"], c["max_abs_diff"], passed, launch.status()])
        lr, lo = ref.losses(), launch.losses()
        for s in range(start + 1, end + 1):
            curve_rows.append([s, loss_fmt(lr.get(s)), f"{world} x {mode}", loss_fmt(lo.get(s)),
                               abs(lr[s] - lo[s]) if s in lr and s in lo else None])
        prev, prev_label = launch, f"{world} x {mode}"
    # The last checkpoint's save (written by the final segment) has no loader: record it too.
    last = save_info(prev, steps)
    last_save = (last["save_s"], last["mb"])
    res["final_save_s"], res["final_checkpoint_mb"] = last_save
    res["passed"] = bool(res["segments"]) and all(s["passed"] for s in res["segments"])
    lr = ref.losses()
    curve = [[s, loss_fmt(lr.get(s)), f"{n} x DDP (uninterrupted = the chain's first segment)", loss_fmt(lr.get(s)),
              0.0 if s in lr else None] for s in range(1, k + 1)] + curve_rows
    shape = "tiny 2-layer Llama, fp32 (CPU)" if b.cpu else f"{a.loss_shape}, bf16"
    md = (f"### 4. Resume across world sizes ({shape}, global batch {plan['global_batch']} throughout, "
          f"{k} steps per segment)\n\nEach checkpoint is saved by one world and loaded by the next. save = the "
          "trainer's `checkpoint/save_s` (shards, manifest, commit); incl. adapter export = from the step's metrics "
          "record to the checkpoint's (adds the PEFT adapter export, a gather under ZeRO-3); load = max over "
          "ranks of the trainer's `load_checkpoint` (verify, read every shard, reassemble, apply); verify = rank "
          "0's choice and SHA-256 check of the checkpoint (`find_resume_checkpoint`).\n\n" + table(
              ["segment", "saved by", "at step", "save s", "save incl. adapter export s", "checkpoint MB",
               "resumed on", "load s", "verify s",
               "steps compared", "same samples", "max |diff| vs uninterrupted", f"pass (<= {a.atol:g})", "status"],
              rows)
          + f"\n\nFinal checkpoint (step {steps}, by {prev_label}): save {fmt(last_save[0])} s, "
          f"{fmt(last_save[1])} MB.\n\nLoss curve, uninterrupted {n}-GPU DDP run against the chain:\n\n"
          + table(["step", "uninterrupted loss", "chain segment", "chain loss", "|diff|"], curve))
    b.record("resume", res, md)


# ----------------------------------------------------------------------------------------------------
# Phase 5: two agents ("nodes") on one host through launch/multinode.sh


def phase_nodes(b: Bench) -> None:
    a, plan = b.args, loss_plan(b)
    n = b.n - (b.n % 2)
    name = f"nodes_2x{n // 2}"
    if n < 2:
        b.record("nodes", {"skipped": "needs 2 GPUs"}, "### 5. Two agents on one host\n\nskipped: needs >= 2 GPUs")
        return
    per = n // 2
    cached = name in b.launches
    launch = b.launches.setdefault(name, Launch(name, n, "ddp", b.work / name))
    timeout = None if cached else b.launch_timeout()
    steps = plan["steps"]
    accum = plan["global_batch"] // (a.loss_micro * n)
    if plan["global_batch"] % (a.loss_micro * n):
        accum = 1
    ov = b.overrides(launch.out, n, "ddp", which="loss", micro=a.loss_micro, accum=accum, steps=steps, seq=a.seq,
                     save_steps=plan["k"], extra={"model.zero_init": "false"})
    if cached:
        pass
    elif timeout is None:
        launch.skipped = b.skip_reason()
    else:
        shutil.rmtree(launch.out, ignore_errors=True)
        port = free_port()
        procs, logs = [], []
        launch.log = b.work / "logs" / f"{name}.log"
        print(f"[bench] {name}: 2 agents x {per} ...", flush=True)
        with GpuMemPoller(not b.cpu) as poll:
            launch.started, t0 = time.time(), time.monotonic()
            for node in (0, 1):
                extra = {"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "GPUS_PER_NODE": str(per)}
                if not b.cpu:
                    extra["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(node * per, (node + 1) * per))
                cmd = ["bash", str(REPO / "launch" / "multinode.sh"), *ov]
                launch.commands.append(" ".join(f"{k}={v}" for k, v in extra.items()) + " " + shlex.join(cmd))
                log = open(b.work / "logs" / f"{name}.node{node}.log", "w")  # noqa: SIM115
                logs.append(log)
                procs.append(b.spawn(cmd, env=b.env(per, extra), stdout=log))
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(timeout=max(1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    launch.timed_out = True
            for p in procs:
                b.reaped(p)
            launch.wall_s = time.monotonic() - t0
        for log in logs:
            log.close()
        launch.rcs = [p.returncode for p in procs]
        launch.rc = 0 if all(rc == 0 for rc in launch.rcs) else next(rc for rc in launch.rcs if rc != 0)
        launch.gpu_peak_mib = dict(poll.peak)
        launch.log.write_text("".join((b.work / "logs" / f"{name}.node{i}.log").read_text() for i in (0, 1)))
        b._after(launch)
    ref = b.launches.get(f"loss_ddp_{n}")
    c = compare(ref, launch, range(1, steps + 1)) if ref is not None and ref.ok and n == b.n else None
    recs = [r for r in launch.records() if "train/loss" in r and r["step"] > 1]
    tps = median([r.get("perf/input_tokens_per_s_per_gpu") for r in recs])
    ckpt = sorted(p.name for p in (launch.out / "checkpoints").glob("step-*")) if launch.out.is_dir() else []
    passed = launch.ok and len(launch.losses()) == steps and (c is None or (
        c["same_samples"] and c["max_abs_diff"] is not None and c["max_abs_diff"] <= a.atol))
    res = {"agents": 2, "per_agent": per, "rcs": launch.rcs, "steps": len(launch.losses()), "tokens_per_s_per_gpu": tps,
           "vs_single_agent": c, "checkpoints": ckpt, "passed": passed, "status": launch.status(),
           "wall_s": launch.wall_s}
    rows = [[f"2 x {per}", "DDP", ", ".join(str(r) for r in launch.rcs), len(launch.losses()), tps,
             None if c is None else c["same_samples"], None if c is None else c["max_abs_diff"],
             ", ".join(ckpt), passed, launch.wall_s, launch.status()]]
    md = ("### 5. Two torchrun agents on one host (launch/multinode.sh, NNODES=2, MASTER_ADDR=127.0.0.1), "
          "phase 3's configuration\n\n" + table(
              ["agents x processes", "mode", "exit codes", "steps", "input tokens/s per GPU",
               "same samples as 1 agent", "max |diff| vs 1 agent", "checkpoints", "pass", "wall s", "status"], rows))
    b.record("nodes", res, md)


# ----------------------------------------------------------------------------------------------------
# Phase 6: SIGTERM during an N-GPU run


def phase_sigterm(b: Bench) -> None:
    a = b.args
    n = b.n
    rows, res = [], {"goal_s": a.sigterm_goal_s, "runs": {}}
    for target in a.sigterm_targets:
        name = f"sigterm_{target}_{n}"
        r = sigterm_run(b, name, n, target)
        res["runs"][target] = r
        rows.append([target, n, a.sigterm_mode, r.get("step_s"), r.get("signal_step"), r.get("checkpoint_step"),
                     r.get("to_commit_s"), r.get("to_exit_s"), r.get("trainer_save_s"),
                     ", ".join(map(str, r.get("rank_exit_codes") or [])), r.get("status_file_code"), r.get("agent_rc"),
                     ", ".join(map(str, r.get("torchrun_exit_codes") or [])) or "none printed",
                     r.get("one_verified_checkpoint"), r.get("passed"), r.get("goal_met"), r.get("status")])
    res["passed"] = bool(res["runs"]) and all(r.get("passed") for r in res["runs"].values())
    shape = "tiny 2-layer Llama (CPU)" if b.cpu else (a.sigterm_shape or a.shape)
    md = (f"### 6. SIGTERM during a {n}-GPU run ({shape}, {a.sigterm_mode}, per-GPU batch {a.micro} x {a.seq}, no "
          "periodic checkpoints): seconds from the signal\n\n" + table(
              ["signal to", "GPUs", "mode", "step s", "signal after step", "checkpoint step", "to commit s",
               "to exit s", "trainer save s", "ranks' exit codes", "status file exit_code", "torchrun exit",
               "torchrun's report", "one verified checkpoint", "pass (75, checkpoint)",
               f"exit < {a.sigterm_goal_s:g} s", "status"], rows)
          + "\n\nTo commit: the signal until `checkpoints/step-N` appears (the rank that saw it finishes its "
          "step first: up to one step time); to exit: until the torchrun agent has exited. Ranks' exit codes: "
          "the trainer's own (`SystemExit`, recorded by the `_trainer` wrapper). torchrun exits 1 when any "
          "worker fails, and a rank still tearing down when a peer's 75 reaches the agent is SIGTERMed by it "
          "(-15 in torchrun's report, after the commit): launch/multinode.sh and slurm.sbatch read the "
          "status file for that reason.")
    b.record("sigterm", res, md)


def sigterm_run(b: Bench, name: str, n: int, target: str) -> dict:
    a = b.args
    if name in b.sigterm_results:  # a phase re-rendered after a stop
        return b.sigterm_results[name]
    out = b.work / name
    status_file = b.work / f"{name}.status.json"
    launch = b.launches.setdefault(name, Launch(name, n, a.sigterm_mode, out))
    timeout = b.launch_timeout()
    if timeout is None or launch.started is not None:
        launch.skipped = launch.skipped or (b.skip_reason() if launch.started is None else None)
        return {"status": launch.status()}
    shutil.rmtree(out, ignore_errors=True)
    status_file.unlink(missing_ok=True)
    ov = b.overrides(out, n, a.sigterm_mode, which="sigterm", micro=a.micro, accum=1, steps=100000, seq=a.seq)
    cmd = b.torchrun(n, ov, timed=True)
    launch.commands.append(f"DISTSFT_STATUS_FILE={status_file} " + shlex.join(cmd))
    launch.log = b.work / "logs" / f"{name}.log"
    r: dict[str, Any] = {}
    print(f"[bench] {name}: {n} x {a.sigterm_mode}, SIGTERM to {target} after step {a.sigterm_after} ...", flush=True)
    ckpts = out / "checkpoints"
    with open(launch.log, "w") as logf:
        logf.write("$ " + launch.commands[0] + "\n")
        logf.flush()
        launch.started, t_start = time.time(), time.monotonic()
        agent = b.spawn(cmd, env=b.env(n, {"DISTSFT_STATUS_FILE": str(status_file)}), stdout=logf)
        try:
            deadline = t_start + timeout
            while True:  # wait for --sigterm-after optimizer steps
                steps = series(read_records(out), "train/loss")
                if steps and max(steps) >= a.sigterm_after:
                    break
                if agent.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("training ended or never reached the signal step")
                time.sleep(0.05)
            ranks = [p for p in children_map().get(agent.pid, []) if _is_rank(p)]
            r["signal_step"] = max(steps)
            t_sig = time.monotonic()
            if target == "agent":
                os.kill(agent.pid, signal.SIGTERM)
            else:
                for p in ranks:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGTERM)
            committed = None
            while agent.poll() is None and time.monotonic() < deadline:
                if committed is None and ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
                    committed = time.monotonic() - t_sig
                time.sleep(0.005)
            if agent.poll() is None:
                launch.timed_out = True
                b.reaped(agent)
            r["to_exit_s"] = time.monotonic() - t_sig if not launch.timed_out else None
            if committed is None and ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
                committed = r["to_exit_s"]  # committed between the last poll and the exit
            r["to_commit_s"] = committed
        except RuntimeError as e:
            r["error"] = str(e)
        finally:
            b.reaped(agent)
            launch.rc = agent.returncode
            launch.rcs = [agent.returncode]
            launch.wall_s = time.monotonic() - t_start
    log = launch.log.read_text()
    r["agent_rc"] = launch.rc
    r["torchrun_exit_codes"] = [int(x) for x in _exitcodes(log)]
    r["rank_exit_codes"] = [e.get("code") for e in sorted(timing_events(launch, "exit"), key=lambda e: e["rank"])]
    r["step_s"] = median([x.get("perf/step_time_s") for x in read_records(out) if "train/loss" in x])
    saves = [line for line in log.splitlines() if " committed: " in line and "checkpoint " in line]
    if saves:
        with contextlib.suppress(ValueError, IndexError):
            r["trainer_save_s"] = float(saves[-1].rsplit(" in ", 1)[1].rstrip("s"))
    with contextlib.suppress(OSError, json.JSONDecodeError):
        st = json.loads(status_file.read_text())
        r["status_file"] = st
        r["status_file_code"] = st.get("exit_code")
    committed_dirs = sorted(p for p in ckpts.glob("step-*")) if ckpts.is_dir() else []
    r["checkpoint_step"] = int(committed_dirs[-1].name.split("-")[1]) if committed_dirs else None
    verified = False
    if len(committed_dirs) == 1:
        try:
            from distsft.checkpoint import verify

            verify(committed_dirs[0])
            verified = True
        except Exception as e:  # a CheckpointError, or distsft not importable here
            r["verify_error"] = str(e)
    r["one_verified_checkpoint"] = verified
    # Ranks that torchrun prints: 75, or -15 for a rank still tearing down when a peer's 75 reached the
    # agent, which then SIGTERMs the rest (Python has restored the default handler by then). Harmless: every
    # rank leaves the save only after the commit; torchrun itself exits 1 either way, hence the status file.
    printed = r["torchrun_exit_codes"]
    codes_ok = (r.get("status_file_code") == REQUEUE_EXIT_CODE
                and r["rank_exit_codes"] == [REQUEUE_EXIT_CODE] * n
                and all(c in (REQUEUE_EXIT_CODE, -signal.SIGTERM) for c in printed)
                and (not printed or REQUEUE_EXIT_CODE in printed))
    r["passed"] = bool(codes_ok and verified and "error" not in r and r.get("to_exit_s") is not None)
    r["goal_met"] = None if r.get("to_exit_s") is None else r["to_exit_s"] < a.sigterm_goal_s
    r["status"] = launch.status() if launch.timed_out or "error" in r else f"agent exit {launch.rc}"
    # the launch is "ok" for the bench when the trainer did what preemption asks
    b.sigterm_results[name] = r
    launch.error = None if r["passed"] else log[-3000:]
    if not r["passed"]:
        print(f"[bench] {name}: FAILED {r}\n{log[-3000:]}", flush=True)
    else:
        print(f"[bench] {name}: commit after {fmt(r['to_commit_s'])}s, exit after {fmt(r['to_exit_s'])}s", flush=True)
    b.save()
    return r


def _is_rank(pid: int) -> bool:
    try:
        return b"LOCAL_RANK=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _exitcodes(log: str) -> list[str]:
    """The worker exit codes torchrun prints in its failure summary ("exitcode  : 75")."""
    out = []
    for line in log.splitlines():
        s = line.strip()
        if s.startswith("exitcode") and ":" in s:
            v = s.split(":", 1)[1].strip().split()[0]
            if v.lstrip("-").isdigit():
                out.append(v)
    return out


# ----------------------------------------------------------------------------------------------------
# Markdown


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


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("phases", nargs="+", help="all, or some of: " + ", ".join(
        f"{i} {p}" for i, p in enumerate(PHASES, 1)))
    ap.add_argument("--cpu", action="store_true", help="CPU processes (gloo, DS_ACCELERATOR=cpu), tiny models")
    ap.add_argument("--gpus", default=None, help="world sizes for phase 1; the largest is N for the others "
                    "(default 1,2,4,8 capped at the visible GPUs; --cpu: 1,2)")
    ap.add_argument("--modes", default="ddp,zero2", help="phase 1 modes (ddp, zero2, zero3)")
    ap.add_argument("--out", help="markdown file (FILE.json beside it gets the raw numbers)")
    ap.add_argument("--workdir", help="runs, logs, models, data cache (default /tmp/distsft-bench-<time>)")
    ap.add_argument("--data", help=f"real SFT data for every phase (default {DEFAULT_DATA}; the embedded demo "
                    "rows when missing)")
    ap.add_argument("--data-rows", type=int, help="use only the first N rows of --data (faster tokenisation)")
    ap.add_argument("--shape", default="llama3-8b", help="phases 1 and 6 (a launch/shapes name or a config dir)")
    ap.add_argument("--big-shape", default="llama3-70b", help="phase 2")
    ap.add_argument("--loss-shape", default="llama3-1b", help="phases 3-5")
    ap.add_argument("--seq", type=int, help="packed slot length (default 2048; --cpu 256)")
    ap.add_argument("--micro", type=int, help="per-GPU batch of phases 1 and 6 (default 2; --cpu 1)")
    ap.add_argument("--warmup", type=int, help="phase 1 steps not measured (default 3; --cpu 1)")
    ap.add_argument("--steps", type=int, help="phase 1 measured steps (default 10; --cpu 3)")
    ap.add_argument("--big-micro", type=int, default=1)
    ap.add_argument("--big-gc", default=None, help="phase 2 model.gradient_checkpointing (default true; --cpu false)")
    ap.add_argument("--big-warmup", type=int, help="default 2; --cpu 1")
    ap.add_argument("--big-steps", type=int, help="default 4; --cpu 2")
    ap.add_argument("--loss-micro", type=int, default=1, help="phases 3-5 per-GPU micro-batch")
    ap.add_argument("--chain-k", type=int, help="phases 3-5: steps per resume segment (default 4; --cpu 2)")
    ap.add_argument("--lr", type=float, default=1e-3, help="constant learning rate (every phase)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--atol", type=float, help="loss agreement for parity/resume (default 2e-2 bf16; --cpu 2e-5 fp32)")
    ap.add_argument("--sigterm-targets", default="agent,ranks", help="agent (torchrun) and/or ranks (every worker)")
    ap.add_argument("--sigterm-mode", default="ddp", choices=["ddp", "zero2", "zero3"])
    ap.add_argument("--sigterm-after", type=int, help="signal once this many steps are logged (default 3; --cpu 2)")
    ap.add_argument("--sigterm-goal-s", type=float, default=10.0)
    ap.add_argument("--sigterm-shape", help="phase 6 model (default: --shape)")
    ap.add_argument("--prebuild", action=argparse.BooleanOptionalAction, default=True,
                    help="draw each random model once and load it in every launch (default on)")
    ap.add_argument("--deadline-s", type=float, help="start no launch that cannot finish before this many seconds "
                    "from the start (a device call's limit, less margin)")
    ap.add_argument("--min-launch-s", type=float, help="time a launch needs at least (default 120; --cpu 20)")
    ap.add_argument("--launch-timeout-s", type=float, default=900.0)
    ap.add_argument("--commit", help="the commit to record (the device's copy of .git may be stale)")
    ap.add_argument("--logs", help="also write every launch log and metrics.jsonl to this .tar.gz")
    args = ap.parse_args(argv)
    names = []
    for p in args.phases:
        for q in p.split(","):
            if q == "all":
                names += PHASES
            elif q.isdigit() and 1 <= int(q) <= len(PHASES):
                names.append(PHASES[int(q) - 1])
            elif q in PHASES:
                names.append(q)
            else:
                ap.error(f"unknown phase {q!r}")
    args.phases = [p for p in PHASES if p in names]
    cpu = args.cpu
    defaults = dict(seq=(256, 2048), micro=(1, 2), warmup=(1, 3), steps=(3, 10), big_gc=("false", "true"),
                    big_warmup=(1, 2), big_steps=(2, 4), chain_k=(2, 4), atol=(2e-5, 2e-2), sigterm_after=(2, 3),
                    min_launch_s=(20.0, 120.0))
    for k, (c, g) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, c if cpu else g)
    args.gpus = [int(x) for x in (args.gpus or ("1,2" if cpu else "1,2,4,8")).split(",") if x.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in ("ddp", "zero2", "zero3"):
            ap.error(f"--modes: {m!r} is not ddp, zero2 or zero3")
    args.sigterm_targets = [t.strip() for t in args.sigterm_targets.split(",") if t.strip()]
    for t in args.sigterm_targets:
        if t not in ("agent", "ranks"):
            ap.error(f"--sigterm-targets: {t!r} is not agent or ranks")
    return args


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_trainer":
        trainer_entry(argv[1:])
        return 0
    if argv and argv[0] == "_prebuild":
        prebuild_entry(argv[1], argv[2], argv[3], int(argv[4]), argv[5])
        return 0
    if argv and argv[0] == "report":
        ap = argparse.ArgumentParser(prog="bench_multigpu.py report")
        ap.add_argument("files", nargs="+")
        ap.add_argument("--out")
        r = ap.parse_args(argv[1:])
        report(r.files, r.out)
        return 0
    args = parse_args(argv)
    os.environ.update(NO_MULTICAST)  # this process too (it may touch CUDA for the provenance)
    bench = Bench(args)
    print(f"[bench] {bench.provenance['device']}, world sizes {bench.gpus}, phases {', '.join(args.phases)}; "
          f"work in {bench.work}", flush=True)
    def stop(signum, frame):  # e.g. the device call's time limit: leave no worker holding a GPU
        if Bench.stopping:
            return
        Bench.stopping = True
        for proc in list(Bench.live):
            kill_tree(proc.pid)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    funcs = {"scaling": phase_scaling, "zero3": phase_zero3, "parity": phase_parity, "resume": phase_resume,
             "nodes": phase_nodes, "sigterm": phase_sigterm}
    failed = []
    try:
        for phase in args.phases:
            try:
                funcs[phase](bench)
            except Exception as e:  # one phase's bug must not lose the others' numbers
                import traceback

                traceback.print_exc()
                bench.notes.append(f"phase {phase} raised {type(e).__name__}: {e}")
                failed.append(phase)
            except SystemExit:  # stopped: the phase's table from what it finished (the rest is skipped)
                bench.notes.append(f"stopped by a signal during phase {phase}")
                with contextlib.suppress(Exception):
                    funcs[phase](bench)
                raise
    finally:
        bench.save()
        if args.logs:
            import tarfile

            with tarfile.open(args.logs, "w:gz") as tar:
                tar.add(bench.work / "logs", arcname="logs")
                for m in bench.work.glob("*/metrics.jsonl"):
                    tar.add(m, arcname=f"metrics/{m.parent.name}.jsonl")
    print("\n" + render(bench.payload()), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
