"""The trainer in every distributed mode side by side, on one saved model and one dataset, plus plain
HF+PEFT under the same DeepSpeed JSON: is DeepSpeed costing us the single-GPU speed? (issue 18)

    python launch/bench_zero.py --data FILE --out launch/results/zero_h100.md          # one GPU, the 8B shape
    python launch/bench_zero.py --modes none,zero3,zero3+gc --peers zero3 --out x.md    # a subset
    python launch/bench_zero.py --cpu --out /tmp/z.md                                   # the code paths on CPU

A mode is a DeepSpeed setting with optional variants joined by '+':

  none            no DeepSpeed (one process, or DDP with --gpus > 1)
  zero1, zero2    ds_configs/zero1.json / zero2.json as shipped (`distributed.zero12=auto`: DDP when
                  partitioning the trainable state saves under 1 GiB per GPU, which is what a LoRA run gets)
  zero2-ds        zero2.json with distributed.zero12=deepspeed (DeepSpeed's ZeRO-2 engine, for comparison)
  zero3           ds_configs/zero3.json (`distributed.zero3_gather=layer`: whole decoder layers gathered)
  zero3-module    zero3.json with distributed.zero3_gather=module (DeepSpeed's per-module gathering)
  zero3-dsonly    zero3.json with distributed.zero3_fast_paths=false (DeepSpeed's own per-step host code)
  +gc             recompute every decoder layer (model.gradient_checkpointing=true)
  +lean           recompute with the checkpointed inputs in host memory (+ model.offload_checkpoints=true)
  +qlora          a 4-bit NF4 base (model.load_in_4bit=true)

A peer (--peers) is plain transformers + peft (fp32 adapters, SDPA, r=16 on the seven projections, torch
AdamW) under `accelerate` with the same DeepSpeed JSON ("none": no DeepSpeed), on random tokens of the same
shape; `+gc` recomputes every decoder layer (transformers' gradient checkpointing, non-reentrant), the
like-for-like peer of the trainer's `+gc` rows. Every launch is `torchrun --standalone --nproc_per_node
<gpus>`; the trainer's launches read the same saved model (drawn once on the GPU, `model.name_or_path`), the
same packed data (`--data`, a JSON/JSONL file, `max_seq_len` = --seq) at per-GPU micro-batch --micro, no
accumulation, constant learning rate. Per launch, from the trainer's metrics.jsonl (median of the steps
after --warmup): input tokens/s, forward+backward and optimizer seconds, peak allocated memory (rank 0),
what the kernel census of the first step says ran, and the largest |loss - loss of the first trainer mode|
over the common steps.

Output: the markdown table on stdout and in --out with provenance (GPU, versions, commit, date, every
command), --out's .json the raw numbers, both rewritten after every launch. "vs no DeepSpeed" is a
DeepSpeed mode's tokens/s over its partner's in the same round (base `none`, the same variants).
--repeat N runs the trainer modes N rounds in the given order and adds a per-mode summary (median,
range, the partner ratio of every round): at one GPU ZeRO-3 is host-bound and one call is not a figure.
--deadline-s stops starting launches that would not finish in time; skipped ones are listed.

On a GPU host with a time limit per run: `python launch/bench_zero.py --data gsm8k_train_alpaca.json
--workdir /tmp/bz --deadline-s 540 --commit <sha> --out zero.md` (--commit where the host's copy of the tree
has no .git; the same --workdir lets the next run reuse the saved model and the data cache).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata as md
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
TRAIN = REPO / "distsft" / "train.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
BASES = {
    "none": {},
    "zero1": {"distributed.deepspeed_config": "zero1"},
    "zero2": {"distributed.deepspeed_config": "zero2"},
    "zero2-ds": {"distributed.deepspeed_config": "zero2", "distributed.zero12": "deepspeed"},
    "zero3": {"distributed.deepspeed_config": "zero3"},
    "zero3-module": {"distributed.deepspeed_config": "zero3", "distributed.zero3_gather": "module"},
    "zero3-dsonly": {"distributed.deepspeed_config": "zero3", "distributed.zero3_fast_paths": "false"},
}
VARIANTS = {
    "gc": {"model.gradient_checkpointing": "true"},
    "lean": {"model.gradient_checkpointing": "true", "model.offload_checkpoints": "true"},
    "qlora": {"model.load_in_4bit": "true"},
}
DEFAULT_MODES = ("none,zero1,zero2,zero2-ds,zero3,zero3-module,none+gc,zero3+gc,none+lean,zero3+lean,"
                 "none+qlora+lean,zero3+qlora+lean")


def mode_overrides(mode: str, workdir: Path) -> dict[str, str]:
    """The trainer overrides of `mode`. `base@key=value@...` also sets `zero_optimization.key` (a JSON
    value) in a copy of the base's DeepSpeed JSON written to `workdir` (for trying DeepSpeed settings)."""
    base, *variants = mode.split("+")
    base, *settings = base.split("@")
    if base not in BASES or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"unknown mode {mode!r}: a base of {sorted(BASES)} with variants of {sorted(VARIANTS)}")
    out = {k: (str(REPO / "ds_configs" / f"{v}.json") if k == "distributed.deepspeed_config" else v)
           for k, v in BASES[base].items()}
    if settings:
        if "distributed.deepspeed_config" not in out:
            raise SystemExit(f"{mode}: @settings need a DeepSpeed base")
        ds = json.loads(Path(out["distributed.deepspeed_config"]).read_text())
        for kv in settings:
            key, _, value = kv.partition("=")
            v = json.loads(value)
            ds["zero_optimization"][key] = int(v) if isinstance(v, float) and v.is_integer() else v
        path = workdir / f"ds_{mode.split('+')[0].replace('@', '_').replace('=', '-')}.json"
        path.write_text(json.dumps(ds, indent=1))
        out["distributed.deepspeed_config"] = str(path)
    for v in variants:
        out.update(VARIANTS[v])
    return out


# ----------------------------------------------------------------------------------------------------
# The peer: transformers + peft under accelerate (run by torchrun, never by hand)


def peer_entry(argv: list[str]) -> None:
    """`_peer MODEL DS_JSON|none MICRO SEQ WARMUP STEPS OUT_JSON CPU GC`: HF+PEFT steps under accelerate
    (GC "1": transformers' gradient checkpointing on every decoder layer)."""
    model_dir, ds_path, micro, seq, warmup, steps, out_json, cpu, gc = argv
    micro, seq, warmup, steps, cpu, gc = int(micro), int(seq), int(warmup), int(steps), cpu == "1", gc == "1"
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = torch.float32 if cpu else torch.bfloat16
    plugin = None
    if ds_path != "none":
        ds = json.loads(Path(ds_path).read_text())
        ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
                  train_batch_size=micro * world, gradient_clipping=1.0)
        ds["bf16"], ds["fp16"] = {"enabled": dtype == torch.bfloat16}, {"enabled": False}
        for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            ds.get("zero_optimization", {}).pop(k, None) if cpu else None  # CPU: DeepSpeed's defaults
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
        if cpu and world > 1:
            PartialState(backend="gloo")  # accelerate alone does not see a CPU torchrun as distributed
    acc = Accelerator(deepspeed_plugin=plugin, mixed_precision="bf16" if plugin and not cpu else "no")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager" if cpu else "sdpa")
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where transformers skips the recomputation
    # Entries into the first decoder layer's MLP: two a step where the layer is recomputed. A pre-hook, since
    # torch's recomputation stops as soon as it has what the backward needs (the MLP's own end is never reached).
    layer_calls = [0]

    def count_entry(*_):
        layer_calls[0] += 1

    next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp")).register_forward_pre_hook(count_entry)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, opt = acc.prepare(model, opt)
    vocab = acc.unwrap_model(model).config.vocab_size  # (a DeepSpeed engine's `config` is its JSON)
    g = torch.Generator().manual_seed(acc.process_index)
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup + steps):
        ids = torch.randint(0, vocab, (micro, seq), generator=g).to(acc.device)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    if acc.is_main_process:
        step = statistics.median(times[warmup:])
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        Path(out_json).write_text(json.dumps({"tokens_per_s": micro * seq * world / step, "step_s": step,
                                              "peak_gib": peak, "loss": float(loss),
                                              "layer_forwards_per_step": layer_calls[0] / (warmup + steps)}))
    acc.end_training()


def peer_spec(spec: str) -> tuple[str, bool]:
    """`zero3`, `none+gc`, ...: the peer's DeepSpeed config name (or "none") and whether it recomputes."""
    ds, *variants = spec.split("+")
    if variants not in ([], ["gc"]) or (ds != "none" and not (REPO / "ds_configs" / f"{ds}.json").is_file()):
        raise SystemExit(f"unknown peer {spec!r}: a config of ds_configs/ (without .json) or 'none', "
                         "optionally with '+gc'")
    return ds, bool(variants)


# ----------------------------------------------------------------------------------------------------
# Launching and reading back


def run_logged(cmd: list[str], env: dict, log: Path, timeout: float | None) -> tuple[int, float]:
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.monotonic() - t0


def census_line(event: dict | None) -> str:
    """'lora 224/224 rms_norm 65/65 ...' from the trainer's `kernels` event: ours / patched per kernel."""
    if not event:
        return "?"
    ran, patched = event.get("ran", {}), event.get("patched", {})
    parts = []
    for kernel, n in patched.items():
        if n:
            ours = ran.get(kernel, {}).get("fused" if kernel == "lora" else "triton", 0)
            parts.append(f"{kernel} {ours}/{n}")
    deq = ran.get("dequantize_4bit")
    if deq:
        parts.append("dequant " + " ".join(f"{k} {v}" for k, v in sorted(deq.items())))
    parts += [k.split(" ")[0] for k in ran.get("loss", {})]
    gathered = dict(ran.get("zero3_layer_gather", {}))
    kept = gathered.pop("kept_whole", 0)
    if gathered:
        parts.append("ZeRO-3 layers gathered by distsft " + "/".join(f"{v} {k}" for k, v in sorted(gathered.items())))
    if kept:
        parts.append(f"{kept} layers kept whole (one rank)")
    straight = ran.get("zero3_gradients", {}).get("one_rank")
    if straight:
        parts.append(f"{straight} gradients straight to their partitions")
    return ", ".join(parts)


def trainer_numbers(metrics: Path, warmup: int) -> dict:
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    steps = [r for r in records if "perf/input_tokens_per_s" in r and r["step"] > warmup]
    census = next((r for r in records if r.get("event") == "kernels"), None)
    model = next((r for r in records if r.get("event") == "model"), {})

    def med(key):
        vals = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {
        "tokens_per_s": med("perf/input_tokens_per_s"), "fwd_bwd_s": med("time/fwd_bwd_s"),
        "optimizer_s": med("time/optimizer_s"), "step_s": med("perf/step_time_s"),
        "peak_gib": max((r.get("mem/peak_allocated_gib") or 0 for r in steps), default=None) or None,
        "losses": {r["step"]: r["train/loss"] for r in records if r.get("train/loss") is not None},
        "census": census_line(census), "fallbacks": len((census or {}).get("fallbacks", {})),
        "ran_as": model.get("distributed"), "zero_stage": model.get("zero_stage"),
        "steps_measured": len(steps),
    }


class Bench:
    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.cpu = args.cpu
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.gpus = 1 if self.cpu else args.gpus
        self.env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "WANDB_MODE": "offline"}
        if self.cpu:
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.round = 1
        self.provenance = self._provenance()

    def remaining(self) -> float:
        return float("inf") if self.args.deadline_s is None else self.args.deadline_s - (time.monotonic() - self.t0)

    def model_dir(self) -> Path:
        """The saved random-init model every launch reads (drawn once; kept in --workdir for the next call)."""
        if self.cpu:
            out = self.work / "model-cpu"
            if not out.exists():
                sys.path.insert(0, str(REPO / "tests"))
                from _support import write_tiny_llama

                cfg_dir = write_tiny_llama(self.work / "tiny-config")
                subprocess.run([sys.executable, str(REPO / "launch" / "bench_multigpu.py"), "_prebuild",
                                str(cfg_dir), str(out), "float32", "0", "cpu"], check=True, env=self.env,
                               stdout=subprocess.DEVNULL)
            return out
        out = self.work / f"model-{self.args.shape}"
        if not out.exists():
            subprocess.run([sys.executable, str(REPO / "launch" / "bench_multigpu.py"), "_prebuild",
                            str(REPO / "launch" / "shapes" / self.args.shape), str(out), "bfloat16", "0", "cuda"],
                           check=True, env=self.env)
        return out

    def torchrun(self) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}"]

    def trainer(self, mode: str) -> None:
        a, name = self.args, mode.replace("+", "_").replace("@", "_").replace("=", "-")
        if a.repeat > 1:
            name += f"_r{self.round}"  # each round's run directory and log kept
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        o = {"model.name_or_path": self.model_dir(), "model.tokenizer": "builtin:tiny-llama",
             "model.dtype": "float32" if self.cpu else "bfloat16",
             "data.sources": json.dumps([{"path": a.data}]) if a.data else '[{"path": "builtin:gsm8k-demo"}]',
             "data.max_seq_len": a.seq, "data.cache_dir": self.work / "cache", "data.progress_bar": "false",
             "train.per_device_train_batch_size": a.micro, "train.gradient_accumulation_steps": 1,
             "train.max_steps": a.warmup + a.steps, "train.learning_rate": 1e-4,
             "train.lr_scheduler_type": "constant", "train.warmup_ratio": 0, "train.output_dir": out,
             "checkpoint.save_steps": 0, "logging.logging_steps": 1, "logging.progress_bar": "false"}
        if self.cpu:
            o.update({"model.attn_implementation": "eager", "kernels.backend": "auto"})
        o.update(mode_overrides(mode, self.work))
        cmd = [*self.torchrun(), str(TRAIN), *(f"{k}={v}" for k, v in o.items())]
        rc, secs = run_logged(cmd, self.env, self.work / f"{name}.log", self.remaining() - 5)
        row = {"kind": "distsft", "mode": mode, "round": self.round, "rc": rc, "seconds": round(secs, 1),
               "command": shlex.join(cmd), **trainer_numbers(out / "metrics.jsonl", a.warmup)}
        self.rows.append(row)

    def peer(self, spec: str) -> None:
        a = self.args
        ds, gc = peer_spec(spec)
        name = spec.replace("+", "_")
        out = self.work / f"peer_{name}.json"
        out.unlink(missing_ok=True)
        ds_path = "none" if ds == "none" else str(REPO / "ds_configs" / f"{ds}.json")
        cmd = [*self.torchrun(), str(SELF), "_peer", str(self.model_dir()), ds_path, str(a.micro), str(a.seq),
               str(a.warmup), str(a.steps), str(out), "1" if self.cpu else "0", "1" if gc else "0"]
        rc, secs = run_logged(cmd, self.env, self.work / f"peer_{name}.log", self.remaining() - 5)
        row = {"kind": "HF+PEFT", "mode": spec, "rc": rc, "seconds": round(secs, 1), "command": shlex.join(cmd)}
        if out.exists():
            row.update(json.loads(out.read_text()))
        self.rows.append(row)

    def _provenance(self) -> dict:
        versions = {}
        for pkg in ("torch", "triton", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"):
            with contextlib.suppress(md.PackageNotFoundError):
                versions[pkg] = md.version(pkg)
        gpu = "CPU (gloo, DS_ACCELERATOR=cpu)"
        if not self.cpu and shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()[0]
        commit = self.args.commit or subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                    capture_output=True, text=True).stdout.strip()
        return {"date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": gpu,
                "gpus": self.gpus, "host": platform.node(), "python": platform.python_version(),
                "versions": versions, "commit": commit or "unknown",
                "command": shlex.join(["python", *sys.argv]),
                "shape": "tiny (tests/_support)" if self.cpu else self.args.shape,
                "batch": f"{self.args.micro} x {self.args.seq} per GPU", "data": self.args.data or "builtin:gsm8k-demo"}

    def partner_ratio(self, row: dict) -> float | None:
        """tokens/s of a DeepSpeed mode over its partner without DeepSpeed (the same variants, base `none`)
        in the same round; None where there is no such pair."""
        base, *variants = row["mode"].split("+")
        if row["kind"] != "distsft" or base == "none" or not row.get("tokens_per_s"):
            return None
        partner = next((r for r in self.rows if r["kind"] == "distsft" and r.get("round") == row.get("round")
                        and r["mode"].split("+")[0] == "none" and sorted(r["mode"].split("+")[1:]) == sorted(variants)
                        and r.get("tokens_per_s")), None)
        return row["tokens_per_s"] / partner["tokens_per_s"] if partner else None

    def summary(self) -> str:
        """Per mode over the --repeat rounds: median tokens/s (and the range), and the ratio to its partner
        without DeepSpeed in each round (the issue's figure), so that one slow or fast call is visible."""
        lines = ["| mode | rounds | tokens/s, median (min-max) | vs the same without DeepSpeed, per round | median |",
                 "|" + " --- |" * 5]
        for mode in dict.fromkeys(r["mode"] for r in self.rows if r["kind"] == "distsft"):
            rows = [r for r in self.rows if r["kind"] == "distsft" and r["mode"] == mode and r.get("tokens_per_s")]
            if not rows:
                continue
            tps = [r["tokens_per_s"] for r in rows]
            ratios = [x for x in (self.partner_ratio(r) for r in rows) if x is not None]
            lines.append(f"| {mode} | {len(rows)} | {statistics.median(tps):,.0f} ({min(tps):,.0f}-{max(tps):,.0f}) "
                         f"| {' / '.join(f'{x:.1%}' for x in ratios)} "
                         f"| {f'{statistics.median(ratios):.1%}' if ratios else ''} |")
        return "\n".join(lines)

    def table(self) -> str:
        firsts = {}  # round -> the first trainer mode's row with a figure (the 'vs first' and loss reference)
        for r in self.rows:
            if r["kind"] == "distsft" and r.get("tokens_per_s"):
                firsts.setdefault(r.get("round", 1), r)
        lines = ["| run | tokens/s | vs first | vs no DeepSpeed | fwd+bwd s | optimizer s | peak GiB | ran as "
                 "| kernels run in step 1 | max abs loss diff vs first |", "|" + " --- |" * 10]
        for r in self.rows:
            ref = firsts.get(r.get("round", 1))
            tps = r.get("tokens_per_s")
            rel = f"{tps / ref['tokens_per_s']:.1%}" if tps and ref else ""
            partner = self.partner_ratio(r)
            partner = "" if partner is None else f"{partner:.1%}"
            diff = ""
            if r.get("losses") and ref and ref.get("losses"):
                common = set(r["losses"]) & set(ref["losses"])
                if common:
                    diff = f"{max(abs(r['losses'][s] - ref['losses'][s]) for s in common):.2e}"
            fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
            status = "" if r["rc"] == 0 else f" (exit {r['rc']})"
            ran_as = "" if r["kind"] != "distsft" else f"{r.get('ran_as')}, stage {r.get('zero_stage')}"
            rnd = f" (round {r['round']})" if self.args.repeat > 1 and r["kind"] == "distsft" else ""
            lines.append(f"| {r['kind']} {r['mode']}{rnd}{status} | {fmt(tps, ',.0f')} | {rel} | {partner} "
                         f"| {fmt(r.get('fwd_bwd_s'), '.3f')} | {fmt(r.get('optimizer_s'), '.3f')} "
                         f"| {fmt(r.get('peak_gib'), '.1f')} | {ran_as} "
                         f"| {r.get('census', '')} | {diff} |")
        return "\n".join(lines)

    def write(self) -> None:
        md_text = [f"## bench_zero: {self.provenance['shape']}, {self.provenance['batch']}, "
                   f"{self.provenance['gpus']} x {self.provenance['device']}", "", self.table(), ""]
        if self.args.repeat > 1:
            md_text += [f"Over {self.args.repeat} rounds (each round runs the modes in the order given):", "",
                        self.summary(), ""]
        if self.skipped:
            md_text += [f"Skipped (deadline): {', '.join(self.skipped)}", ""]
        md_text += ["Provenance:", "", "```", json.dumps(self.provenance, indent=1), "```", "", "Commands:", ""]
        md_text += [f"- {r['kind']} {r['mode']} (exit {r['rc']}, {r['seconds']} s): `{r['command']}`"
                    for r in self.rows]
        if self.args.out:
            out = Path(self.args.out)
            out.write_text("\n".join(md_text) + "\n")
            out.with_suffix(".json").write_text(json.dumps({"provenance": self.provenance, "rows": self.rows,
                                                            "skipped": self.skipped}, indent=1, default=str))
        print(self.table(), flush=True)
        if self.args.repeat > 1:
            print(self.summary(), flush=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_peer":
        peer_entry(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated trainer modes, in order (the first is "
                   "the reference of the 'vs first' and loss columns)")
    p.add_argument("--peers", default="zero3,none", help="DeepSpeed configs for the HF+PEFT peer ('none' allowed; "
                   "'+gc' recomputes every layer; '' for no peer)")
    p.add_argument("--shape", default="llama3-8b", help="a directory of launch/shapes/")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--data", help="a JSON/JSONL instruction file (default the embedded demo rows)")
    p.add_argument("--workdir", default="/tmp/bench_zero")
    p.add_argument("--commit", help="the commit measured (the GPU machine's copy has no .git)")
    p.add_argument("--deadline-s", type=float)
    p.add_argument("--repeat", type=int, default=1, help="run the trainer modes this many rounds, in the given "
                   "order each time (a mode beside its partner in every round), and add a per-mode summary: the host "
                   "moves a ZeRO-3 figure by several points between calls minutes apart")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo), the tiny test model, fp32")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.cpu:
        args.micro, args.seq = min(args.micro, 1), min(args.seq, 256)
    bench = Bench(args)
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    modes = [m for m in args.modes.split(",") if m]
    jobs = [("trainer", m, k) for k in range(1, args.repeat + 1) for m in modes]
    peers = [d for d in args.peers.split(",") if d]
    for d in peers:
        peer_spec(d)  # a typo fails now, not after the trainer launches
    jobs += [("peer", d, 1) for d in peers]
    for i, (kind, what, rnd) in enumerate(jobs):
        per_launch = (time.monotonic() - bench.t0) / i if i else 0
        if bench.remaining() < max(30.0, 0.8 * per_launch):
            bench.skipped += [f"{k} {w}" + (f" (round {r})" if args.repeat > 1 and k == "trainer" else "")
                              for k, w, r in jobs[i:]]
            break
        bench.round = rnd
        getattr(bench, kind)(what)
        bench.write()
    bench.write()
    return 0 if all(r["rc"] == 0 for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
