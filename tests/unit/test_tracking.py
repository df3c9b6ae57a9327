"""Tracker: JSONL schema, offline W&B and TensorBoard records read back, resume, secrets never written."""

import importlib.util
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from distsft.config import LoggingConfig
from distsft.redaction import is_secret_key, redact
from distsft.tracking import METRICS_FILE, SUMMARY_FILE, Tracker, check_trackers

FAKE_WANDB_KEY = "fakewandbkey0123456789abcdefUNIQUEa1b2c3"
FAKE_HF_TOKEN = "hf_FAKEuniqueTOKENforDistsftTests0123456789"
FAKE_CONFIG_TOKEN = "cfg-secret-UNIQUE-7f3a9c"
SECRETS = (FAKE_WANDB_KEY, FAKE_HF_TOKEN, FAKE_CONFIG_TOKEN)

# wandb is a dependency and tensorboard a dev one: CI has both; the GPU machine has no wandb.
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("WANDB_MODE", "offline")


def run_config():
    """A resolved-config-like dict with secrets in the places users put them."""
    return {
        "model": {"name_or_path": "meta-llama/Llama-3.1-8B", "hub_token": FAKE_CONFIG_TOKEN},
        "train": {"learning_rate": 2e-4, "output_dir": "/tmp/x"},
        "logging": {"wandb_project": "distsft-tests"},
        "env": {"HF_TOKEN": FAKE_HF_TOKEN, "note": f"key={FAKE_WANDB_KEY}"},
        "tokenizer": {"pad_token": "<pad>"},
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# Reading a .wandb file. wandb 0.31 ships no Python reader (its `datastore` module is gone; the Go core
# reads the file); the format is wandb's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version),
# then 32 KiB blocks of chunks, each `<crc32 u32><length u16><type u8>` + payload, carrying serialized
# `wandb.proto.wandb_internal_pb2.Record` messages.


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, "corrupt .wandb chunk"
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def complete_records(wandb_file: Path, timeout: float = 20.0) -> list:
    """The file's records once its `exit` record is there: wandb-core may still be flushing the file
    for a moment after `finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(wandb_file))
        except AssertionError:  # the header or a chunk is still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_wandb_run(run_dir: Path) -> dict:
    """run id, config, history rows (by _step) and summary of one offline run directory."""
    (wandb_file,) = run_dir.glob("*.wandb")
    out = {"run_id": None, "config": {}, "history": [], "summary": {}}
    for rec in complete_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            out["start_time"] = rec.run.start_time.ToMicroseconds()
            out["project"] = rec.run.project
            out["group"] = rec.run.run_group
            out["tags"] = list(rec.run.tags)
            out["notes"] = rec.run.notes
            out["job_type"] = rec.run.job_type
            out["display_name"] = rec.run.display_name
            for u in rec.run.config.update:
                out["config"][_item_key(u)] = json.loads(u.value_json)
        elif kind == "config":
            for u in rec.config.update:
                out["config"][_item_key(u)] = json.loads(u.value_json)
        elif kind == "history":
            out["history"].append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for u in rec.summary.update:
                out["summary"][_item_key(u)] = json.loads(u.value_json)
    return out


def offline_run_dirs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


def assert_no_secrets(root: Path, console: str = ""):
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for s in SECRETS:
                assert s.encode() not in data, f"secret {s[:8]}... written to {path}"
    for s in SECRETS:
        assert s not in console, f"secret {s[:8]}... printed to the console"


@pytest.fixture(scope="module", autouse=True)
def _wandb_teardown():
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


# ----------------------------------------------------------------------------------------------------


def test_redact_keys_env_values_and_nesting(secret_env):
    cfg = run_config()
    out = redact(cfg)
    assert out["model"]["hub_token"] == "***"
    assert out["env"]["HF_TOKEN"] == "***"
    assert out["env"]["note"] == "key=***"  # the env value is found inside a longer string
    assert out["tokenizer"]["pad_token"] == "<pad>"  # a special token is not a secret
    assert out["train"] == cfg["train"]
    assert cfg["model"]["hub_token"] == FAKE_CONFIG_TOKEN  # the input is not modified
    assert redact(["a", FAKE_WANDB_KEY, ("x", FAKE_HF_TOKEN)]) == ["a", "***", ("x", "***")]
    assert redact({"api_key": None})["api_key"] is None
    for key in ("api_key", "WANDB_API_KEY", "token", "hf_token", "password", "client_secret", "apiKey"):
        assert is_secret_key(key), key
    for key in ("pad_token", "eos_token", "tokenizer", "max_tokens", "learning_rate", "key"):
        assert not is_secret_key(key), key


def test_jsonl_schema_events_summary_and_step_order(tmp_path, secret_env):
    cfg = LoggingConfig()
    t = Tracker(cfg, tmp_path, is_main=True, config_dict=run_config())
    t.log({"train/loss": 2.5, "train/learning_rate": 1e-4}, step=1)
    t.log({"eval/loss": 2.4}, step=1)  # equal steps are fine
    t.log({"train/loss": float("nan"), "train/grad_norm": math.inf, "train/skipped": True}, step=2)
    t.event("checkpoint_saved", step=2, path=f"/ckpt/{FAKE_HF_TOKEN}", world_size=2)
    with pytest.raises(ValueError, match="must not decrease"):
        t.log({"train/loss": 1.0}, step=1)
    with pytest.raises(ValueError, match="reserved"):
        t.log({"step": 3.0}, step=3)
    with pytest.raises(TypeError):
        t.log({"train/name": "text"}, step=3)
    t.summary({"final_loss": 1.5, "best_loss": float("nan"), "adapter_dir": "/out/adapter"})
    t.close()
    t.close()  # idempotent
    t.log({"train/loss": 1.0}, step=9)  # after close: ignored

    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
            for line in lines]
    assert len(recs) == 4
    for r in recs:
        assert isinstance(r["step"], int) and isinstance(r["time"], float)
    assert set(recs[0]) == {"step", "time", "train/loss", "train/learning_rate"}
    assert recs[0]["train/loss"] == 2.5 and recs[1]["eval/loss"] == 2.4
    assert recs[2]["train/loss"] is None and recs[2]["train/grad_norm"] is None and recs[2]["train/skipped"] == 1
    assert recs[3] == {"event": "checkpoint_saved", "step": 2, "time": recs[3]["time"],
                       "path": "/ckpt/***", "world_size": 2}
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary == {"run_id": t.run_id, "final_loss": 1.5, "best_loss": None, "adapter_dir": "/out/adapter"}
    assert_no_secrets(tmp_path)


def test_non_main_rank_is_a_no_op(tmp_path):
    out = tmp_path / "out"
    t = Tracker(LoggingConfig(report_to=["wandb", "tensorboard"]), out, is_main=False,
                config_dict={}, run_id="abc12345")
    t.log({"train/loss": 1.0}, step=1)
    t.event("resumed", step=1)
    t.summary({"x": 1})
    t.close()
    assert t.run_id == "abc12345"
    assert not out.exists()


@needs_wandb
def test_wandb_offline_run_has_metrics_config_summary_and_no_secrets(tmp_path, secret_env, capfd):
    cfg = LoggingConfig(report_to=["wandb"], wandb_project="distsft-tests", wandb_group="g1",
                        wandb_tags=["unit", "cpu"], wandb_notes="notes here", wandb_job_type="sft",
                        run_name="unit-run")
    check_trackers(cfg)
    t = Tracker(cfg, tmp_path, is_main=True, config_dict=run_config(), world_size=2)
    for step in (1, 2, 3):
        t.log({"train/loss": 3.0 - step / 10, "perf/input_tokens_per_s": 100.0 * step}, step=step)
    t.event("checkpoint_saved", step=3, path=f"/ckpt/{FAKE_WANDB_KEY}")
    t.summary({"final_loss": 2.7, "adapter_dir": "/out/adapter"})
    t.close()
    print(f"the user's own print of a token-free line: {t.run_id}")

    (run_dir,) = offline_run_dirs(tmp_path)
    run = read_wandb_run(run_dir)
    assert run["run_id"] == t.run_id
    assert (run["project"], run["group"], run["tags"], run["notes"], run["job_type"], run["display_name"]) == (
        "distsft-tests", "g1", ["unit", "cpu"], "notes here", "sft", "unit-run")
    rows = [r for r in run["history"] if "train/loss" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3]
    assert [r["train/loss"] for r in rows] == pytest.approx([2.9, 2.8, 2.7])
    assert [r["perf/input_tokens_per_s"] for r in rows] == [100.0, 200.0, 300.0]
    assert any(r.get("events/checkpoint_saved") == 1 and r["_step"] == 3 for r in run["history"])
    config = run["config"]
    assert config["train"]["learning_rate"] == 2e-4
    assert config["model"]["hub_token"] == "***" and config["env"]["HF_TOKEN"] == "***"
    assert config["world_size"] == 2
    assert run["summary"]["final_loss"] == 2.7 and run["summary"]["adapter_dir"] == "/out/adapter"

    captured = capfd.readouterr()
    console = captured.out + captured.err
    assert t.run_id in console  # wandb's own banner was captured, so the check below sees it
    assert_no_secrets(tmp_path, console)


@needs_tb
def test_tensorboard_event_files_hold_the_scalars(tmp_path, secret_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Tracker(LoggingConfig(report_to=["tensorboard"]), tmp_path, is_main=True, config_dict=run_config())
    t.log({"train/loss": 2.0, "train/learning_rate": 1e-3}, step=1)
    t.log({"train/loss": 1.5, "train/learning_rate": 9e-4}, step=2)
    t.event("world_size_changed", step=2, old=2, new=4)
    t.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.0), (2, 1.5)]
    assert [e.step for e in acc.Scalars("train/learning_rate")] == [1, 2]
    assert [e.value for e in acc.Scalars("events/world_size_changed/new")] == [4.0]
    assert "config" in acc.Tags()["tensors"] or "config/text_summary" in acc.Tags()["tensors"]
    assert_no_secrets(tmp_path)


@needs_wandb
@needs_tb
def test_resume_continues_the_same_run_with_monotonic_steps(tmp_path, secret_env):
    """Attempt 1 logs steps 1-5 but its last checkpoint is step 3; attempt 2 resumes from 3 with the
    stored run id: the W&B pieces share the id (and `wandb sync` joins them in order), TensorBoard
    drops attempt 1's steps 4-5, and the kept steps increase throughout."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = LoggingConfig(report_to=["wandb", "tensorboard"])
    first = Tracker(cfg, tmp_path, is_main=True, config_dict=run_config())
    for step in range(1, 6):
        first.log({"train/loss": 10.0 + step}, step=step)
    first.close(exit_code=1)  # the attempt crashed after step 5

    second = Tracker(cfg, tmp_path, is_main=True, config_dict=run_config(), run_id=first.run_id,
                     world_size=2, start_step=3)
    assert second.run_id == first.run_id
    second.event("resumed", step=3, from_step=3)
    with pytest.raises(ValueError, match="must not decrease"):
        second.log({"train/loss": 0.0}, step=2)
    for step in range(4, 7):
        second.log({"train/loss": 20.0 + step}, step=step)
    second.close()

    # Both pieces may start within one second: wandb then names the second `...-<id>-1`; `wandb sync`
    # orders the pieces of one run by start time, and so does this check.
    pieces = sorted((read_wandb_run(d) for d in offline_run_dirs(tmp_path)), key=lambda p: p["start_time"])
    assert [p["run_id"] for p in pieces] == [first.run_id, first.run_id]
    steps = [[r["_step"] for r in p["history"] if "train/loss" in r] for p in pieces]
    assert steps == [[1, 2, 3, 4, 5], [4, 5, 6]]
    assert pieces[1]["config"]["world_size"] == 2

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    kept = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert kept == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]

    recs = [r for r in read_jsonl(tmp_path / METRICS_FILE) if "event" not in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 4, 5, 6]  # appended; readers keep the latest
    assert_no_secrets(tmp_path)


# ----------------------------------------------------------------------------------------------------
# check_trackers


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


@needs_wandb
def test_check_trackers_online_needs_a_key(monkeypatch, no_key):
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ValueError, match="no W&B API key"):
        check_trackers(LoggingConfig(report_to=["wandb"]))
    check_trackers(LoggingConfig(report_to=["tensorboard"]))  # no wandb: no key needed
    check_trackers(LoggingConfig(report_to=["wandb"], wandb_mode="offline"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(LoggingConfig(report_to=["wandb"]))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    check_trackers(LoggingConfig(report_to=["wandb"]))
    monkeypatch.setenv("WANDB_MODE", "online")
    no_key.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    os.chmod(no_key, 0o600)
    check_trackers(LoggingConfig(report_to=["wandb"]))  # `wandb login` wrote netrc
    no_key.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    check_trackers(LoggingConfig(report_to=["wandb"]))


def test_check_trackers_missing_packages(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match="wandb package is not installed"):
        check_trackers(LoggingConfig(report_to=["wandb"]))
    check_trackers(LoggingConfig(report_to=[]))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ValueError, match="tensorboard package is not installed"):
        check_trackers(LoggingConfig(report_to=["tensorboard"]))


# ----------------------------------------------------------------------------------------------------
# progress: step timer, throughput meter, progress bar, summary


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_throughput_meter_window_hand_computed():
    from distsft.progress import StepTimer, ThroughputMeter

    clock = FakeClock()
    timer = StepTimer(cuda_sync=False, clock=clock)
    meter = ThroughputMeter(world_size=2, peak_flops=1e12, total_steps=10, start_step=0, clock=clock)
    for _ in range(2):  # two optimizer steps of 2.0 s: data 0.2, forward+backward 1.5, optimizer 0.3
        with timer.phase("data"):
            clock.t += 0.2
        with timer.phase("fwd_bwd"):
            clock.t += 1.5
        with timer.phase("optimizer"):
            clock.t += 0.3
        meter.update(samples=4, input_tokens=2000, label_tokens=500, flops=1e12)  # this rank's
    with pytest.raises(ValueError, match="unknown phase"), timer.phase("backward"):
        pass
    # Two ranks with identical counts: the reduced window holds 16 samples, 8000 input tokens, 2000
    # label tokens and 4e12 FLOPs over 4.0 s.
    m = meter.compute(2, timer=timer, reduce=lambda t: t * 2)
    assert m["perf/samples_per_s"] == pytest.approx(16 / 4)
    assert m["perf/input_tokens_per_s"] == pytest.approx(8000 / 4)
    assert m["perf/label_tokens_per_s"] == pytest.approx(2000 / 4)
    assert m["perf/input_tokens_per_s_per_gpu"] == pytest.approx(1000)
    assert m["perf/label_tokens_per_s_per_gpu"] == pytest.approx(250)
    assert m["perf/step_time_s"] == pytest.approx(2.0)
    assert m["perf/tflops_per_gpu"] == pytest.approx(0.5)  # 4e12 / 4 s / 2 GPUs
    assert m["perf/mfu"] == pytest.approx(0.5)  # of a 1 TFLOP/s peak
    assert m["time/data_s"] == pytest.approx(0.2)
    assert m["time/fwd_bwd_s"] == pytest.approx(1.5)
    assert m["time/optimizer_s"] == pytest.approx(0.3)
    assert m["time/other_s"] == pytest.approx(0.0)
    assert m["progress/eta_s"] == pytest.approx(8 * 2.0)
    assert not any(k.startswith("mem/") for k in m)  # no CUDA here

    clock.t += 3.0  # one more step of 3 s, counts already global
    meter.update(samples=2, input_tokens=900, label_tokens=300, flops=0.0)
    m = meter.compute(3)
    assert m["perf/input_tokens_per_s"] == pytest.approx(300)
    assert "time/data_s" not in m
    totals = meter.totals()
    assert totals["steps"] == 3 and totals["final_step"] == 3
    assert (totals["samples"], totals["input_tokens"], totals["label_tokens"]) == (18, 8900, 2300)
    assert totals["train_seconds"] == pytest.approx(7.0)
    assert totals["input_tokens_per_s"] == pytest.approx(8900 / 7)
    assert totals["mfu"] == pytest.approx(4e12 / 7 / 2 / 1e12)
    assert totals["peak_memory_gib"] is None


def test_meter_without_peak_reports_no_mfu():
    from distsft.progress import ThroughputMeter

    clock = FakeClock()
    meter = ThroughputMeter(peak_flops=None, clock=clock)
    meter.update(samples=1, input_tokens=10, label_tokens=5, flops=1e9)
    clock.t += 1.0
    m = meter.compute(1)
    assert "perf/mfu" not in m and m["perf/tflops_per_gpu"] == pytest.approx(1e-3)
    assert "progress/eta_s" not in m  # no total_steps


def test_progress_bar_main_only_with_loss_in_postfix(capsys, caplog):
    import logging

    from distsft.progress import ProgressBar

    bar = ProgressBar(10, initial=2, is_main=True, enabled=True)
    bar.update(3)
    bar.log(5, {"train/loss": 1.2345, "train/learning_rate": 2e-4, "progress/eta_s": 125.0})
    bar.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=1.234" in err
    assert "eta=" not in err  # one ETA: the bar's own remaining time (the log lines below carry ours)

    other = ProgressBar(10, is_main=False)
    other.update(5)
    other.log(5, {"train/loss": 1.0})
    other.write("hello")
    other.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

    with caplog.at_level(logging.INFO, logger="distsft.progress"):
        plain = ProgressBar(10, is_main=True, enabled=False)
        plain.log(7, {"train/loss": 0.5, "progress/eta_s": 125.0})
        plain.close()
    assert "step 7 | loss 0.5 | eta 2:05" in caplog.text


def test_print_summary_returns_what_it_prints():
    """One train loss, named as what it is (the mean of the last logging window); a CPU run is labelled in
    processes, not GPUs; a resumed run says so and reports the whole run's label tokens."""
    from distsft.progress import print_summary

    totals = {"steps": 3, "final_step": 3, "world_size": 2, "input_tokens": 8900, "input_tokens_per_s_per_gpu": 1.5,
              "train_seconds": 7.0, "mfu": 0.2857, "peak_memory_gib": None, "device": "cuda"}
    lines = []
    d = print_summary(totals, train_loss=0.42, train_loss_steps=3, adapter_dir="/out/adapter",
                      print_fn=lines.append)
    assert d == {**{k: v for k, v in totals.items() if v is not None}, "final_train_loss": 0.42,
                 "final_train_loss_steps": 3, "adapter_dir": "/out/adapter"}
    (text,) = lines
    for expected in ("optimizer steps", "8,900", "0:07", "28.6%", "train loss, mean of the last 3 steps  0.42",
                     "/out/adapter", "GPUs", "input tokens/s per GPU"):
        assert expected in text, expected
    assert "peak memory" not in text and "best" not in text and "final step" not in text
    silent = []
    assert print_summary(totals, enabled=False, print_fn=silent.append)["steps"] == 3
    assert silent == []

    cpu, lines = {**totals, "device": "cpu", "steps": 2, "final_step": 5}, []
    d = print_summary(cpu, train_loss=0.4, train_loss_steps=2, run_label_tokens=9000, run_train_seconds=3725.0,
                      print_fn=lines.append)
    (text,) = lines
    assert "GPU" not in text and "processes (CPU)" in text and "input tokens/s per process" in text
    assert "2 this session (resumed at step 3 of 5)" in text and "label tokens, whole run" in text
    assert "train time, whole run" in text and "1:02:05" in text and "train time, this session" in text
    assert d["resumed_at_step"] == 3 and d["run_label_tokens"] == 9000 and d["run_train_seconds"] == 3725.0


@pytest.mark.gpu
@pytest.mark.skipif(not importlib.util.find_spec("torch") or not __import__("torch").cuda.is_available(),
                    reason="needs CUDA")
def test_meter_reports_cuda_memory_and_syncs_phases():
    import torch

    from distsft.flops import peak_flops
    from distsft.progress import StepTimer, ThroughputMeter

    timer = StepTimer()  # syncs: CUDA is in use below
    meter = ThroughputMeter(peak_flops=peak_flops(torch.cuda.get_device_name()))
    x = torch.randn(4096, 4096, device="cuda")
    with timer.phase("fwd_bwd"):
        for _ in range(20):
            y = x @ x
    meter.update(samples=1, input_tokens=1, label_tokens=1, flops=20 * 2 * 4096**3)
    m = meter.compute(1, timer=timer)
    assert m["time/fwd_bwd_s"] > 0 and m["perf/step_time_s"] >= m["time/fwd_bwd_s"]
    assert m["mem/allocated_gib"] >= 2 * 4096 * 4096 * 4 / 1024**3 * 0.99  # x and y
    assert m["mem/peak_allocated_gib"] >= m["mem/allocated_gib"]
    assert m["mem/reserved_gib"] >= m["mem/allocated_gib"]
    if meter.peak_flops is not None:  # fp32 matmuls: well under the bf16 peak, but not zero
        assert 0 < m["perf/mfu"] < 1
    assert meter.totals()["peak_memory_gib"] >= m["mem/allocated_gib"]
    del y


@needs_wandb
def test_secrets_typed_into_config_strings_are_never_written(tmp_path, secret_env, monkeypatch, capfd):
    """Regression (issue 22, fault 8): secrets typed into config strings (`logging.wandb_notes`,
    `logging.run_name`) were written unredacted into config.yaml (the output folder, every checkpoint, the
    adapter) and into W&B's run files, with the command line W&B records. Also a W&B key that only
    `wandb login` knows (netrc, no variable)."""
    from distsft.config import load_config

    netrc_key = "netrcWANDBkey0123456789abcdefUNIQUEzz99"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {netrc_key}\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    github = "ghp_" + "A1b2C3d4" * 5
    overrides = [f"logging.wandb_notes=key {FAKE_WANDB_KEY} and {netrc_key}", f"logging.run_name=run-{FAKE_HF_TOKEN}",
                 f"logging.wandb_tags=[t-{github}]", f"logging.wandb_group=g {FAKE_HF_TOKEN}",
                 "logging.report_to=wandb"]
    monkeypatch.setattr(sys, "argv", ["distsft/train.py", *overrides])
    cfg = load_config(overrides=overrides)
    out = tmp_path / "out"
    out.mkdir()
    cfg.save(out / "config.yaml")
    saved = load_config(out / "config.yaml")
    assert saved.logging.wandb_notes == "key *** and ***" and saved.logging.run_name == "run-***"
    assert saved.logging.wandb_tags == ["t-***"] and saved.train == cfg.train  # the rest is the config as it was

    t = Tracker(cfg.logging, out, is_main=True, config_dict=cfg.to_dict())
    t.log({"train/loss": 1.0}, step=1)
    t.close()
    assert sys.argv[1:] == overrides  # the process's own command line is left as it was
    run = read_wandb_run(offline_run_dirs(out)[0])
    assert (run["notes"], run["display_name"], run["tags"]) == ("key *** and ***", "run-***", ["t-***"])
    captured = capfd.readouterr()
    for s in (netrc_key, github):
        assert s not in captured.out + captured.err
    assert_no_secrets(out, captured.out + captured.err)
    for f in out.rglob("*"):
        if f.is_file():
            assert netrc_key.encode() not in f.read_bytes() and github.encode() not in f.read_bytes(), f
