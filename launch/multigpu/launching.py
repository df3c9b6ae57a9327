"""Launching for launch/bench_multigpu.py: the entry points its subprocesses run, process helpers, one
training launch (`Launch`: its command, exit status, metrics), and `Bench`, one call of the script: world
sizes, the time left, the models, each run's overrides and its torchrun launch (reporting.py writes what
it measured)."""

from __future__ import annotations

import contextlib
import json
import os
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

from . import NO_MULTICAST, REPO
from .reporting import Report, fmt, provenance, run_quiet

TRAIN = REPO / "distsft" / "train.py"
SCRIPT = REPO / "launch" / "bench_multigpu.py"  # its `_trainer` and `_prebuild` commands run the entry points below
SHAPES = REPO / "launch" / "shapes"
REQUEUE_EXIT_CODE = 75  # distsft.lifecycle.REQUEUE_EXIT_CODE (not imported: the parent stays light)
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
T0 = time.monotonic()  # --deadline-s counts from here
TINY_LAYERS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)  # tests/_support.write_tiny_llama


# ----------------------------------------------------------------------------------------------------
# Worker entry points (run by torchrun / as subprocesses, never by hand)


def trainer_entry(argv: list[str]) -> None:
    """`distsft/train.py`'s command line, plus the exit code each rank leaves with, appended to
    `<output_dir>/bench_timing.rank<R>.jsonl` (the sigterm phase reads every rank's own 75 there; torchrun
    prints only the failed ones). Checkpoint load times are the trainer's own `checkpoint/load_s`."""
    import importlib.util

    if importlib.util.find_spec("distsft") is None:  # a checkout that is not installed
        sys.path.append(str(REPO))
    from distsft.entry import exit_cleanly, parse_args, run

    cfg = parse_args(argv)
    from distsft.train import main  # torch and the rest load after the command line is checked
    rank = int(os.environ.get("RANK", "0"))
    timing = Path(cfg.train.output_dir) / f"bench_timing.rank{rank:03d}.jsonl"

    def note(what: str, **fields) -> None:
        timing.parent.mkdir(parents=True, exist_ok=True)
        with open(timing, "a") as f:
            f.write(json.dumps({"what": what, "rank": rank, **fields}, default=str) + "\n")

    try:
        run(main, cfg)
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


def is_rank(pid: int) -> bool:
    try:
        return b"LOCAL_RANK=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def printed_exit_codes(log: str) -> list[str]:
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
        self.notes: list[str] = []
        self.gpus = sorted({g for g in args.gpus if 1 <= g <= self.visible}) or [1]
        if dropped := sorted(set(args.gpus) - set(self.gpus)):
            self.notes.append(f"--gpus {','.join(map(str, dropped))} dropped: {self.visible} visible")
        self.n = max(self.gpus)
        self.data = prepare_data(self)
        self.models: dict[str, str] = {}  # shape key -> model override (init_from_config or name_or_path)
        self.report = Report(args.out, provenance(self), self.t0)
        self.report.notes = self.notes
        self.results = self.report.results  # the phases' numbers (and the prebuilt models')

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

    @property
    def dtype(self) -> str:
        return "float32" if self.cpu else "bfloat16"

    # -- run configuration ---------------------------------------------------------------------

    def overrides(self, out: Path, world: int, mode: str, *, which: str, micro: int, accum: int, steps: int,
                  seq: int, save_steps: int = 0, extra: dict | None = None) -> list[str]:
        o: dict[str, Any] = {
            **model_overrides(self, which),
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
        entry = [str(SCRIPT), "_trainer"] if timed else [str(TRAIN)]
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

    # -- output (reporting.py) -----------------------------------------------------------------

    def record(self, phase: str, result: dict, markdown: str) -> None:
        self.report.record(phase, result, markdown, self.launches)

    def payload(self) -> dict:
        return self.report.payload(self.launches)

    def save(self) -> None:
        self.report.save(self.launches)


def prepare_data(b: Bench) -> str:
    """The data every run trains on: --data (its first --data-rows rows), else the demo rows."""
    path = Path(b.args.data) if b.args.data else DEFAULT_DATA
    if not path.is_file():
        b.notes.append(f"data: {path} not found; the embedded demo rows (builtin:gsm8k-demo, 400 GSM8K "
                          "rows) instead")
        return "builtin:gsm8k-demo"
    if b.args.data_rows:
        rows = json.loads(path.read_text())[: b.args.data_rows]
        sub = b.work / f"data-{b.args.data_rows}.json"
        sub.write_text(json.dumps(rows))
        b.notes.append(f"data: the first {len(rows)} rows of {path}")
        return str(sub)
    return str(path.resolve())


def model_overrides(b: Bench, which: str) -> dict[str, Any]:
    """Overrides naming the model of `which` (shape, big, loss, sigterm): a random model drawn once and saved
    (`model.name_or_path`), or its config (`model.init_from_config`)."""
    if b.cpu:
        if which == "big":  # the demo's 4-layer Llama, built by the trainer (zero_init path)
            return {"model.init_from_config": "builtin:tiny-llama"}
        key = "tiny"
        if key not in b.models:
            base = json.loads((REPO / "distsft" / "assets" / "tiny-llama" / "config.json").read_text())
            base.update(TINY_LAYERS)
            d = b.work / "models" / "tiny-config"
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps(base))
            b.models[key] = str(d)
        src = b.models[key]
    else:
        name = {"shape": b.args.shape, "big": b.args.big_shape, "loss": b.args.loss_shape,
                "sigterm": b.args.sigterm_shape or b.args.shape}[which]
        src = str(SHAPES / name) if (SHAPES / name).is_dir() else name
        if which == "big":
            return {"model.init_from_config": src}
    if not b.args.prebuild or b.launch_timeout() is None:  # (no time left: the launch is skipped)
        return {"model.init_from_config": src}
    key = f"{Path(src).name}-{b.dtype}"
    if key not in b.models:
        b.models[key] = prebuild_model(b, src, key)
    if b.models[key].startswith("init:"):
        return {"model.init_from_config": src}
    return {"model.name_or_path": b.models[key]}

def prebuild_model(b: Bench, src: str, key: str) -> str:
    """Draw the model of config `src` once (`_prebuild`, on GPU 0) into the work directory."""
    out = b.work / "models" / key
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), "_prebuild", src, str(out), b.dtype, str(b.args.seed),
           "cpu" if b.cpu else "cuda:0"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=b.env(1), cwd=b.work,
                          timeout=max(60, min(900, b.remaining())))
    info = {"command": shlex.join(cmd), "rc": proc.returncode, "wall_s": time.monotonic() - t0}
    if proc.returncode != 0:
        b.notes.append(f"prebuild of {src} failed (exit {proc.returncode}); its launches draw the weights "
                          f"themselves (model.init_from_config): {proc.stderr.strip()[-300:]}")
        b.models[key] = "init:"
        return "init:"
    info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    b.results.setdefault("prebuild", {})[key] = info
    print(f"[bench] prebuilt {key}: {info['params']:,} parameters, drawn in {info['draw_s']:.1f}s, saved in "
          f"{info['save_s']:.1f}s", flush=True)
    return str(out)


def overrides_value(overrides: list[str], key: str) -> str:
    for o in overrides:
        if o.startswith(key + "="):
            return o.split("=", 1)[1]
    raise KeyError(key)
