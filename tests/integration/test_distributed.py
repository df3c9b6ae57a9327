"""Every distributed promise with real processes on CPU (gloo; DeepSpeed with DS_ACCELERATOR=cpu).

All runs share one setup: a tiny Llama (fp32, built whole so every mode starts from the same weights),
global batch 6 (micro-batch 1 x accumulation 6/world), 4 steps, a checkpoint every 2. The reference is
the single process with no DeepSpeed. A subprocess that stops making progress (no output, no file
written) for LIMIT seconds fails the test; none has a fixed total limit that a busy machine could trip.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _support import REPO, run_with_progress, write_tiny_llama

from distsft.checkpoint import assemble, find_resume_checkpoint, verify

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = str(REPO / "distsft" / "train.py")
GLOBAL_BATCH = 6
LIMIT = 300  # seconds a launch may go without output or a file written (a hang), however long it takes
ATOL = 2e-5  # loss agreement across world sizes and ZeRO stages (fp32; summation order differs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    def __init__(self, root: Path):
        self.root = root
        self.model = write_tiny_llama(root / "model")
        self.env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def overrides(self, out: Path, world: int, mode: str, extra: dict) -> list[str]:
        o = {
            "model.init_from_config": self.model, "model.tokenizer": "builtin:tiny-llama", "model.dtype": "float32",
            "model.attn_implementation": "eager", "model.zero_init": "false", "lora.r": 8,
            "data.max_seq_len": 256, "data.cache_dir": self.root / "cache",
            "train.per_device_train_batch_size": 1, "train.gradient_accumulation_steps": GLOBAL_BATCH // world,
            "train.max_steps": 4, "train.learning_rate": 3e-3, "train.output_dir": out,
            "checkpoint.save_steps": 2, "logging.logging_steps": 1, "logging.progress_bar": "false",
            "kernels.backend": "torch",
        }
        if mode.startswith("zero"):
            o["distributed.deepspeed_config"] = REPO / "ds_configs" / f"{mode}.json"
        if mode in ("zero1", "zero2"):  # DeepSpeed's engine (auto runs these LoRA jobs as DDP: tested below)
            o["distributed.zero12"] = "deepspeed"
        o.update(extra)
        return [f"{k}={v}" for k, v in o.items()]

    def command(self, out: Path, world: int, mode: str, extra: dict) -> list[str]:
        args = self.overrides(out, world, mode, extra)
        if mode == "single":
            assert world == 1
            return [sys.executable, TRAIN, *args]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                TRAIN, *args]

    def run(self, name: str, world: int, mode: str, expect_rc: int | None = 0, env: dict | None = None,
            **extra) -> "Result":
        out = self.root / name
        proc = run_with_progress(self.command(out, world, mode, extra), cwd=self.root,
                                 env={**self.env, **(env or {})}, watch=out, idle_s=LIMIT)
        if expect_rc is not None and proc.returncode != expect_rc:
            raise AssertionError(f"{name}: exit {proc.returncode}, expected {expect_rc}\n{proc.stderr[-4000:]}")
        return Result(out, proc)


class Result:
    def __init__(self, out: Path, proc):
        self.out, self.proc = out, proc

    def records(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / "metrics.jsonl").read_text().splitlines()]

    def series(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.records() if key in r}


def copy_checkpoint(src: Result, step: int, dest: Path) -> Path:
    import shutil

    target = dest / "checkpoints" / f"step-{step:08d}"
    shutil.copytree(src.out / "checkpoints" / f"step-{step:08d}", target)
    return target


def whole_state(path: Path) -> dict:
    from safetensors.torch import load_file

    frags = []
    for idx in sorted((path / "shards").glob("rank-*.json")):
        tensors = load_file(str(idx.with_suffix(".safetensors")))
        for e in json.loads(idx.read_text()):
            frags.append({**e, "tensors": {k: tensors[f"{k}/{e['name']}"] for k in e["keys"]}})
    return assemble(frags)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def full_runs(runner):
    """Uninterrupted 4-step runs in every mode (each also leaves its step-2 checkpoint)."""
    return {
        "single": runner.run("single", 1, "single"),
        "ddp2": runner.run("ddp2", 2, "ddp"),
        "zero1_2": runner.run("zero1_2", 2, "zero1"),
        "zero2_2": runner.run("zero2_2", 2, "zero2"),
        "zero3_2": runner.run("zero3_2", 2, "zero3"),
        "zero3_offload_2": runner.run("zero3_offload_2", 2, "zero3_offload"),
    }


def assert_same_curve(a: Result, b: Result, steps, atol=ATOL):
    la, lb = a.series("train/loss"), b.series("train/loss")
    da, db = a.series("data/last_step_digest"), b.series("data/last_step_digest")
    for s in steps:
        assert da[s] == db[s], f"step {s}: other samples ({da[s]} vs {db[s]})"
        assert abs(la[s] - lb[s]) <= atol, f"step {s}: loss {la[s]} vs {lb[s]}"


def test_every_mode_matches_the_single_process(full_runs):
    ref = full_runs["single"]
    for name in ("ddp2", "zero1_2", "zero2_2", "zero3_2", "zero3_offload_2"):
        run = full_runs[name]
        assert json.loads((run.out / "summary.json").read_text())["world_size"] == 2, name  # gloo fix held
        assert_same_curve(ref, run, steps=(1, 2, 3, 4))
        # Each rank wrote its own shard (ZeRO) or rank 0 wrote all (DDP): never the frozen base weights.
        shards = sorted(p.name for p in (run.out / "checkpoints" / "step-00000004" / "shards").glob("*.safetensors"))
        assert shards == (["rank-00000.safetensors"] if name == "ddp2"
                          else ["rank-00000.safetensors", "rank-00001.safetensors"]), name


def census(run: Result) -> dict:
    """The first step's kernel census (the trainer's `kernels` event, rank 0's, with the other ranks'
    shortfalls in `ranks_short`)."""
    return next(r for r in run.records() if r.get("event") == "kernels")


FUSED_ONLY = {"kernels.backend": "auto", "kernels.rms_norm": "false", "kernels.rope": "false",
              "kernels.swiglu": "false", "kernels.fused_linear_cross_entropy": "false",
              "kernels.cross_entropy": "false"}
"""The fused LoRA projections alone (plain torch GEMMs: fast on CPU), the other kernels off."""


@pytest.fixture(scope="module")
def kernel_runs(runner):
    """Every kernel on (Triton under the interpreter: TRITON_INTERPRET=1 comes from tests/conftest.py),
    in the modes the README says run them: one process, DDP, DeepSpeed ZeRO-2 and ZeRO-3 on 2 ranks."""
    every = {"kernels.backend": "auto", "checkpoint.save_steps": 0, "train.max_steps": 2}  # interpreted: slow
    return {name: runner.run(name, world, mode, **every)
            for name, world, mode in (("kernels_single", 1, "single"), ("kernels_ddp2", 2, "ddp"),
                                      ("kernels_zero2_2", 2, "zero2"), ("kernels_zero3_2", 2, "zero3"))}


def test_every_kernel_runs_in_every_mode(kernel_runs, full_runs):
    """Issue 18: what the README says runs, runs, on every rank: the first step's census shows every
    patched kernel (RMSNorm, RoPE, SwiGLU: Triton; every LoRA layer: the fused projections; the loss:
    fused linear cross-entropy) ran ours, in one process, under DDP, ZeRO-2 and ZeRO-3. Before, ZeRO-3
    sent every LoRA layer back to peft's forward (any weight with a `ds_id`) while the report still
    counted them. The losses are the one-process run's (two steps: the backward too), and the first step's is
    the plain-PyTorch run's within ATOL.

    Regression (ZeRO-3, whole layers gathered): DeepSpeed reduces a leaf module's gradients when the
    gradient of its inputs is complete, or, when no input requires grad (the first layer, fed by the
    frozen embedding), as soon as its output's gradient arrives: it reduced zeros for layer 0's LoRA
    gradients and then failed to accumulate the real ones ("size of tensor a (0) must match ...")."""
    for name, run in kernel_runs.items():
        c = census(run)
        assert c["missing"] == {} and not c["fallbacks"] and c.get("ranks_short") is None, (name, c)
        assert c["ran"]["lora"] == {"fused": 14} and c["ran"]["rms_norm"] == {"triton": 5}, (name, c)
        assert c["ran"]["loss"] == {"fused_linear_ce (triton)": 1}, (name, c)
        assert "kernels run in step 1: rms_norm 5/5 (triton 5); rope 2/2 (triton 2)" in run.proc.stderr, name
        assert_same_curve(kernel_runs["kernels_single"], run, steps=(1, 2))
        assert_same_curve(full_runs["single"], run, steps=(1,))  # step 2's learning rate depends on max_steps


def test_zero3_adapter_merges_like_the_single_process_one(full_runs, tmp_path):
    """`distsft merge` after a ZeRO-3 run: the exported adapter is gathered whole (and names the random-init
    base the run wrote), so merging it offline gives the model the single process trained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distsft.export import load_adapted, merge_adapter

    zero3, single = full_runs["zero3_2"].out / "adapter", full_runs["single"].out / "adapter"
    a = load_file(str(zero3 / "adapter_model.safetensors"))
    b = load_file(str(single / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(zero3, tmp_path / "merged"), dtype=torch.float32)
    adapted, _ = load_adapted(zero3)
    ids = torch.randint(5, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_zero3_per_module_gathering_falls_back_by_name(runner, full_runs):
    """`distributed.zero3_gather=module` (DeepSpeed's own per-module gathering, hooks on every LoRA layer):
    the census says every LoRA layer ran peft's forward and why, the log warns naming them, the losses
    are unchanged."""
    run = runner.run("zero3_module", 2, "zero3", **FUSED_ONLY, **{"distributed.zero3_gather": "module"})
    c = census(run)
    assert c["ran"]["lora"] == {"peft": 14} and c["missing"] == {"lora": 14}, c
    assert set(c["fallbacks"]) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert "14 LoRA layer(s) ran peft's forward" in run.proc.stderr and "zero3_gather=layer" in run.proc.stderr
    assert_same_curve(full_runs["single"], run, steps=(1, 2, 3, 4))


@pytest.mark.parametrize("world", [2, 1])
def test_zero3_fast_paths_change_only_host_work(runner, world):
    """`distributed.zero3_fast_paths` (on by default) replaces ten pieces of DeepSpeed's per-step host code
    (module list, debug prints, gradient bucket, its reduce-scatter, gradient partitions, gradient norm,
    release at the step, the gather after it, the step's check of the norm, the gathering of the decoder
    layers), and at one rank two more (gradients copied straight into their partitions: the
    reduce-scatter of one rank is the identity; the layers gathered once and kept whole: a gather at one
    rank is a view of the partition, its release frees nothing; the adapter and norms kept whole through
    the step for the same reason): the log names
    each one installed, the census of the first step counts every decoder layer gathered by distsft's
    schedule for its forward and its backward (and none with DeepSpeed's own code), and the run equals
    DeepSpeed's own code (`false`) in losses and gradient norms, step by step, and in the adapter it
    exports. Both runs use the fused AdamW (the on-device skip needs it) and make step 2's gradients
    non-finite on the last rank: both skip that step, on every rank, and go on from the same weights."""
    from safetensors.torch import load_file

    nan = {"env": {"DISTSFT_TEST_FAULT": f"nan_loss@1@{world - 1}"}, "train.optim": "adamw_torch_fused"}
    fast = runner.run(f"zero3_fast_{world}", world, "zero3", **nan)
    plain = runner.run(f"zero3_dsonly_{world}", world, "zero3", **nan, **{"distributed.zero3_fast_paths": "false"})
    line = next(x for x in fast.proc.stderr.splitlines() if "ZeRO-3 host fast paths:" in x)
    one_rank = ["at one rank, each layer's gradients copied straight into their partitions"] if world == 1 else []
    one_rank_layers = ["at one rank, the decoder layers gathered once and kept whole",
                       "at one rank, the persistent parameters kept whole through the optimizer step"]
    one_rank_layers = one_rank_layers if world == 1 else []
    assert "fast paths not installed" not in fast.proc.stderr
    assert line.split("ZeRO-3 host fast paths: ")[1].split("; ") == [
        "the module tree listed once", "debug prints checked before the rank lookup",
        "gradient norm in one foreach launch", "each layer's gradients moved into the reduce bucket together",
        "gradient buckets reduce-scattered with one split per gradient", *one_rank,
        "reduced gradient partitions copied in one foreach call", "parameters released in one call at the step",
        "persistent parameters gathered in one call after the step",
        "non-finite gradients skipped on the device, without waiting for the norm",
        "decoder layers gathered on a fixed schedule", *one_rank_layers], line
    assert "ZeRO-3 host fast paths: off (distributed.zero3_fast_paths=false)" in plain.proc.stderr
    kept = {"kept_whole": 2} if world == 1 else {}  # layers left whole after their forward and backward
    assert census(fast)["ran"]["zero3_layer_gather"] == {"forward": 2, "backward": 2, **kept}, census(fast)
    straight = census(fast)["ran"].get("zero3_gradients")
    assert straight == ({"one_rank": 28} if world == 1 else None), census(fast)  # 2 layers x 7 x (A, B)
    assert "zero3_layer_gather" not in census(plain)["ran"], census(plain)
    for run in (fast, plain):
        assert run.series("train/skipped_steps") == {1: 0, 2: 1, 3: 1, 4: 1}, run.out
        assert run.series("train/loss")[2] is None and run.series("train/grad_norm")[2] in (None, float("inf"))
    for key in ("train/loss", "train/grad_norm"):
        a, b = fast.series(key), plain.series(key)
        assert a.keys() == b.keys() == {1, 2, 3, 4}
        assert all(abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(b[s])) for s in (1, 3, 4)), (key, a, b)
    ours, theirs = (load_file(str(r.out / "adapter" / "adapter_model.safetensors")) for r in (fast, plain))
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


@pytest.mark.parametrize("world, mode, extra", [
    (2, "ddp", {}),
    (2, "zero1", {}),
    (2, "zero2", {}),
    (2, "zero3", {}),
    (2, "zero3", {"model.gradient_checkpointing": "auto", "model.memory_budget_gib": 0.001}),
], ids=["ddp", "zero1", "zero2", "zero3", "zero3-auto"])
def test_lean_mode_in_every_mode(runner, full_runs, world, mode, extra):
    """Issue 18: recomputation with the checkpointed inputs in host memory (`model.offload_checkpoints`),
    refused before on more than one process, and `gradient_checkpointing=auto` (here a budget that forces
    every layer), under DDP and every ZeRO stage, with the fused LoRA projections (whose recompute skips
    the down projection): the same losses as the plain single process."""
    name = f"lean_{mode}_{'_'.join(extra) or 'true'}".replace(".", "_")
    lean = {"model.gradient_checkpointing": "true", "model.offload_checkpoints": "true", "checkpoint.save_steps": 0}
    run = runner.run(name, world, mode, **FUSED_ONLY, **{**lean, **extra})
    events = {r["event"]: r for r in run.records() if "event" in r}
    assert events["recomputation"]["offload"] is True and events["recomputation"]["checkpointed_layers"] == 2
    assert census(run)["ran"]["lora"] == {"fused": 14}
    assert_same_curve(full_runs["single"], run, steps=(1, 2, 3, 4))


def test_zero12_auto_runs_a_lora_job_as_ddp(runner, full_runs):
    """`distributed.zero12=auto` (the default) with the shipped ZeRO-2 JSON: partitioning a LoRA adapter's
    optimizer state would save kilobytes, so the job runs as DDP (logged with the reason; the model
    event records the stage asked for and the mode run), trains the same curve and writes a DDP
    checkpoint (rank 0 alone)."""
    run = runner.run("zero2_auto", 2, "zero2", **{"distributed.zero12": "auto"})
    model = next(r for r in run.records() if r.get("event") == "model")
    assert model["requested_zero_stage"] == 2 and model["zero_stage"] == 0, model
    assert model["distributed"] == "multi_cpu" and "would partition only the trainable state" in model["zero12_as_ddp"]
    assert "running the ZeRO-2 config as DDP" in run.proc.stderr
    assert_same_curve(full_runs["single"], run, steps=(1, 2, 3, 4))
    shards = sorted(p.name for p in (run.out / "checkpoints" / "step-00000004" / "shards").glob("*.safetensors"))
    assert shards == ["rank-00000.safetensors"]


@pytest.mark.parametrize(
    "source, world, mode",
    [
        ("ddp2", 1, "single"),  # 2 -> 1
        ("single", 2, "ddp"),  # 1 -> 2
        ("ddp2", 3, "ddp"),  # 2 -> 3
        ("zero3_2", 3, "zero2"),  # ZeRO-3 on 2 -> ZeRO-2 on 3
        ("zero2_2", 1, "single"),  # ZeRO-2 on 2 -> single process
        ("zero2_2", 1, "zero3"),  # ZeRO-2 on 2 -> ZeRO-3 on one rank (its one-rank paths)
    ],
)
def test_resume_on_another_world_size_and_stage(runner, full_runs, source, world, mode):
    name = f"resume_{source}_to_{mode}{world}"
    copy_checkpoint(full_runs[source], 2, runner.root / name)
    resumed = runner.run(name, world, mode, **{"checkpoint.resume_from_checkpoint": "auto"})
    assert any(r.get("event") == "resumed" for r in resumed.records())
    changed = [r for r in resumed.records() if r.get("event") == "world_size_changed"]
    assert bool(changed) == (world != 2 and source != "single" or world != 1 and source == "single")
    # The steps after the resume see the uninterrupted run's samples and losses.
    assert_same_curve(full_runs["single"], resumed, steps=(3, 4))


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_bf16_model_keeps_its_precision_under_deepspeed(runner, mode):
    """Regression: accelerate wrote its own mixed_precision ("no") into the JSON's "auto" bf16 section as
    it started, so ZeRO-3's zero.Init built a bf16 model in fp32 and ZeRO-2 refused a bf16 model."""
    extra = {"model.dtype": "bfloat16", "model.zero_init": "true", "train.max_steps": 2, "checkpoint.save_steps": 0}
    result = runner.run(f"bf16_{mode}", 1, mode, **extra)
    models = [r for r in result.records() if r.get("event") == "model"]
    assert [(r["dtype"], r["distributed"]) for r in models] == [("bfloat16", "deepspeed")]
    losses = result.series("train/loss")
    assert set(losses) == {1, 2} and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("source, world, mode", [("zero3_2", 3, "zero2"), ("ddp2", 1, "single")])
def test_optimizer_state_after_loading_equals_what_was_saved(runner, full_runs, source, world, mode):
    """Load on another world size / stage, then save again at once: every parameter and Adam moment,
    reassembled, equals the original checkpoint's exactly."""
    saved = full_runs[source].out / "checkpoints" / "step-00000002"
    name = f"resave_{source}_to_{mode}{world}"
    resaved = runner.run(name, world, mode, **{"checkpoint.resume_from_checkpoint": saved, "train.max_steps": 2})
    a, b = whole_state(saved), whole_state(resaved.out / "checkpoints" / "step-00000002")
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        assert a[n]["tensors"].keys() == b[n]["tensors"].keys() == {"param", "exp_avg", "exp_avg_sq"}, n
        for k in a[n]["tensors"]:
            assert torch.equal(a[n]["tensors"][k], b[n]["tensors"][k]), (n, k)
        assert a[n]["scalars"] == b[n]["scalars"] == {"step": 2.0}, n


def test_rank_killed_during_save_leaves_previous_checkpoint(runner, full_runs):
    t0 = time.monotonic()
    crashed = runner.run("killed", 2, "zero2", expect_rc=None, env={"DISTSFT_TEST_FAULT": "kill_in_save@4@1"})
    assert crashed.proc.returncode != 0
    assert time.monotonic() - t0 < 120, "a dead rank must end the job promptly"
    ckpts = crashed.out / "checkpoints"
    assert (ckpts / ".staging-step-00000004").is_dir()  # the interrupted save, never committed
    assert find_resume_checkpoint(crashed.out, "auto") == ckpts / "step-00000002"
    resumed = runner.run("killed", 2, "zero2", **{"checkpoint.resume_from_checkpoint": "auto"})
    verify(ckpts / "step-00000004")
    assert_same_curve(full_runs["single"], resumed, steps=(3, 4))


class Ranks:
    """The ranks of one launch as this test's own children (torchrun's environment, no agent), so that the
    test sees each rank's exit code (torchrun reports only the first failure it notices) and can play the
    agent: when one rank exits, SIGTERM the others, as torchrun does."""

    def __init__(self, runner: Runner, out: Path, world: int, mode: str, extra: dict, env: dict):
        port = free_port()
        self.procs, self.lines = [], []
        args = runner.overrides(out, world, mode, extra)
        for r in range(world):
            rank_env = {**runner.env, **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "WORLD_SIZE": str(world), "RANK": str(r), "LOCAL_RANK": str(r),
                        "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0"}
            self.procs.append(subprocess.Popen([sys.executable, TRAIN, *args], cwd=runner.root, env=rank_env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            self.lines.append([])
        self.last_output = time.monotonic()
        for proc, lines in zip(self.procs, self.lines, strict=True):
            threading.Thread(target=self._pump, args=(proc, lines), daemon=True).start()

    def _pump(self, proc, lines):
        for line in proc.stdout:
            lines.append(line)
            self.last_output = time.monotonic()

    def output(self, rank: int) -> str:
        return "".join(self.lines[rank])

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def test_sigterm_to_one_rank_saves_once_and_every_rank_exits_75(runner):
    """Regression (issue 22, fault 4): exit code 75 on every rank was racy. After logging "exiting with 75"
    each rank spent ~4 s in interpreter finalization, where Python has put back the default SIGTERM action,
    and torchrun SIGTERMs the ranks still alive once the first one exits: in 6 of 11 preemptions one rank
    ended -15. Each rank now leaves at once after the save (a barrier, then no finalization), and a SIGTERM
    at any moment after its last log line changes nothing: here every rank gets one every 20 ms from then
    on, and the test plays the agent too."""
    out = runner.root / "preempt"
    status = runner.root / "preempt-status.json"
    ranks = Ranks(runner, out, 2, "ddp", {"train.max_steps": 400, "checkpoint.save_steps": 0},
                  {"DISTSFT_STATUS_FILE": str(status)})
    try:
        deadline = time.monotonic() + 3 * LIMIT  # start-up only: generous on a busy machine
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
            assert all(p.poll() is None for p in ranks.procs) and time.monotonic() < deadline, "never trained"
            time.sleep(0.2)
        os.kill(ranks.procs[1].pid, signal.SIGTERM)
        os.kill(ranks.procs[1].pid, signal.SIGTERM)  # a second signal must not start a second save
        t0 = time.monotonic()
        while any(p.poll() is None for p in ranks.procs):
            assert time.monotonic() - ranks.last_output < LIMIT, "no output: hung?"
            one_exited = any(p.poll() is not None for p in ranks.procs)
            for r, proc in enumerate(ranks.procs):
                if proc.poll() is None and (one_exited or "exiting with 75" in ranks.output(r)):
                    os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
    finally:
        ranks.kill()
    codes = [p.wait() for p in ranks.procs]
    assert codes == [75, 75], f"{codes}\n{ranks.output(0)[-2000:]}\n{ranks.output(1)[-2000:]}"
    assert elapsed < 30, "signal to exit must fit in torchrun's/Slurm's grace period"
    committed = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(committed) == 1 and committed[0].startswith("step-"), committed
    step = int(committed[0].split("-")[1])
    assert 1 <= step < 400
    assert json.loads(status.read_text()) == {"reason": "preempted", "exit_code": 75, "step": step}
    verify(out / "checkpoints" / committed[0])


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie no longer does)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def sigterm_caught(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (Linux: the SigCgt mask in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_a_signal_during_start_up_ends_with_the_requeue_code(runner, tmp_path):
    """Regression (issue 22, fault 5): a signal during start-up was never requeued. SIGTERM after the model
    was built but before the loop gave -15 on every worker, no status file and torchrun rc 1, so
    launch/slurm.sbatch did not requeue. From process start on, a preemption signal now ends with 75 and a
    status file, with or without a checkpoint: here rank 0 of `distsft train --nproc_per_node 2` signals
    itself right after building the model, and a single process is signalled while it imports torch."""
    out = runner.root / "startup"
    status = tmp_path / "status.json"
    cmd = [sys.executable, "-m", "distsft", "train", "--nproc_per_node", "2",
           *runner.overrides(out, 2, "ddp", {"train.max_steps": 400})]
    proc = run_with_progress(cmd, cwd=runner.root, watch=out, idle_s=LIMIT,
                             env={**runner.env, "DISTSFT_TEST_FAULT": "sigterm_after_model@0@0",
                                  "DISTSFT_STATUS_FILE": str(status)})
    assert proc.returncode == 75, proc.stderr[-4000:]
    assert json.loads(status.read_text()) == {"reason": "preempted", "exit_code": 75, "step": None}
    assert "received SIGTERM outside the training loop" in proc.stderr and not (out / "checkpoints").exists()

    single = subprocess.Popen([sys.executable, TRAIN, *runner.overrides(runner.root / "early", 1, "single", {})],
                              cwd=runner.root, env={**runner.env, "DISTSFT_STATUS_FILE": str(status)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while single.poll() is None and not sigterm_caught(single.pid):
            time.sleep(0.005)
        single.send_signal(signal.SIGTERM)  # its first lines have run; torch is still being imported
        _, stderr = single.communicate(timeout=LIMIT)
    finally:
        if single.poll() is None:
            single.kill()
    assert single.returncode == 75, stderr[-3000:]
    assert "received SIGTERM outside the training loop" in stderr and " model: " not in stderr
    assert json.loads(status.read_text()) == {"reason": "preempted", "exit_code": 75, "step": None}


def test_a_frozen_rank_under_zero2_fails_the_job_within_the_timeout(runner):
    """Regression (issue 22, fault 6): DeepSpeed's collectives ignored `distributed.timeout_minutes`. With
    one rank frozen, DDP exited at its timeout, but ZeRO-2 hung inside DeepSpeed's gradient reduction (its
    clone of the world group got torch's default, 30 minutes for gloo). Rank 1 stops itself (SIGSTOP) before
    its step-3 forward; rank 0 must fail at the 30 s timeout, not hang (the test fails after LIMIT s without
    output)."""
    out = runner.root / "frozen"
    cmd = runner.command(out, 2, "zero2", {"distributed.zero12": "deepspeed", "distributed.timeout_minutes": 0.5,
                                           "train.max_steps": 6, "checkpoint.save_steps": 0})
    agent = subprocess.Popen(cmd, cwd=runner.root, env={**runner.env, "DISTSFT_TEST_FAULT": "freeze@2@1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, last = [], [time.monotonic()]

    def pump():
        for line in agent.stdout:
            lines.append(line)
            last[0] = time.monotonic()

    threading.Thread(target=pump, daemon=True).start()
    workers = {}
    try:
        while agent.poll() is None:
            assert time.monotonic() - last[0] < LIMIT, "no output: hung?\n" + "".join(lines)[-3000:]
            for pid in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split():
                with contextlib.suppress(OSError):
                    rank = int(dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0")
                                    if "=" in kv)["RANK"])
                    workers[rank] = int(pid)
            if 0 in workers and 1 in workers and not alive(workers[0]):
                with contextlib.suppress(OSError):  # rank 0 has failed: let the frozen rank see it too
                    os.kill(workers[1], signal.SIGCONT)
            time.sleep(0.5)
    finally:
        if agent.poll() is None:
            agent.kill()
        for pid in workers.values():  # each in a session of its own: not ended with the agent
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    output = "".join(lines)
    assert agent.returncode != 0
    assert "Timed out" in output or "timed out" in output.lower(), output[-4000:]
    assert '"train/loss"' in (out / "metrics.jsonl").read_text()  # it trained before the freeze


def test_workers_stop_when_the_torchrun_agent_dies(runner):
    """Regression (issue 22): killing the torchrun agent alone left both workers training and writing
    checkpoints for 60 s and more (torchrun starts each in a session of its own, so nothing reached them).
    Each worker now watches its parent; once the agent is gone it stops as on a preemption signal: one
    checkpoint, saved together, and the run ends within a few steps."""
    out = runner.root / "orphans"
    cmd = runner.command(out, 2, "ddp", {"train.max_steps": 100000, "checkpoint.save_steps": 0})
    agent = subprocess.Popen(cmd, cwd=runner.root, env=runner.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, last = [], [time.monotonic()]

    def pump():
        for line in agent.stdout:
            lines.append(line)
            last[0] = time.monotonic()

    threading.Thread(target=pump, daemon=True).start()
    metrics = out / "metrics.jsonl"

    def last_step() -> int:
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
        return max(steps, default=0)

    workers = []
    try:
        deadline = time.monotonic() + 3 * LIMIT  # start-up only
        while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
            assert agent.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        workers = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(agent.pid)], text=True).split()]
        assert len(workers) == 2
        agent.kill()
        agent.wait()
        killed_at = last_step()
        while any(alive(pid) for pid in workers):
            assert last_step() < killed_at + 50, "the workers train on without their agent"
            assert time.monotonic() - max(last[0], metrics.stat().st_mtime) < LIMIT, "hung?"
            time.sleep(0.2)
    finally:
        if agent.poll() is None:
            agent.kill()
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert any(e.get("event") == "preempted" for e in events), "".join(lines)[-3000:]
    (ckpt,) = (out / "checkpoints").iterdir()
    verify(ckpt)


def test_two_torchrun_agents_train_checkpoint_and_resume(runner, full_runs):
    """The multi-node path: two agents (nodes) of one process each, through launch/multinode.sh."""
    out = runner.root / "nodes"

    def both(**extra):
        port = free_port()
        args = runner.overrides(out, 2, "ddp", extra)
        procs = [subprocess.Popen(["bash", str(REPO / "launch" / "multinode.sh"), *args], cwd=runner.root,
                                  env={**runner.env, "NNODES": "2", "NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(port), "GPUS_PER_NODE": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        outputs = [p.communicate(timeout=6 * LIMIT)[0] for p in procs]  # two whole runs: generous
        assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    both()
    assert_same_curve(full_runs["single"], Result(out, None), steps=(1, 2, 3, 4))
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if the job had died after step 2's save
    both(**{"checkpoint.resume_from_checkpoint": "auto"})
    verify(out / "checkpoints" / "step-00000004")
    assert_same_curve(full_runs["single"], Result(out, None), steps=(3, 4))  # the resumed records win


def test_nonfinite_loss_is_skipped_everywhere_or_aborts(runner, full_runs):
    skipped = runner.run("nan_skip", 2, "zero2", env={"DISTSFT_TEST_FAULT": "nan_loss@1@1"})
    assert skipped.series("train/skipped_steps") == {1: 0, 2: 1, 3: 1, 4: 1}
    assert skipped.series("train/loss")[2] is None  # logged as null, never as a number
    for p in (skipped.out / "checkpoints").glob("step-*/shards/*.safetensors"):  # never a NaN checkpoint
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(str(p)).values()), p
    status = runner.root / "nan-status.json"
    aborted = runner.run("nan_abort", 1, "single", expect_rc=65,
                         env={"DISTSFT_TEST_FAULT": "nan_loss@1@0", "DISTSFT_STATUS_FILE": str(status)},
                         **{"distributed.nonfinite_loss": "abort"})
    assert "non-finite" in aborted.proc.stderr
    assert json.loads(status.read_text())["exit_code"] == 65
    assert not (aborted.out / "checkpoints" / "step-00000002").exists()


def test_changed_global_batch_is_refused(runner, full_runs):
    name = "batch_change"
    copy_checkpoint(full_runs["single"], 2, runner.root / name)
    refused = runner.run(name, 1, "single", expect_rc=None, **{"checkpoint.resume_from_checkpoint": "auto",
                                                                "train.gradient_accumulation_steps": 3})
    assert refused.proc.returncode != 0
    assert "global batch of 6" in refused.proc.stderr and "allow_global_batch_change" in refused.proc.stderr
