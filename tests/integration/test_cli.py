"""The `distsft` command end to end, as a user meets it: one-line errors and the trainer's exit codes in one
process and through its launcher (2 ranks), runs that never clobber each other, and the subcommands
(`--help`, `--print-config`, merge, generate, plot, env)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from _support import write_tiny_llama

import distsft
from distsft.checkpoint import verify

pytestmark = pytest.mark.integration
# Every launch below finishes in well under a minute on an idle CPU; the limit only has to catch a hang.
LIMIT = 900


def tiny_run_file(tmp, **extra) -> str:
    model = write_tiny_llama(tmp / "model")
    cfg = {"model": {"init_from_config": str(model), "tokenizer": "builtin:tiny-llama", "dtype": "float32",
                     "attn_implementation": "eager"},
           "lora": {"r": 4}, "data": {"max_seq_len": 256, "cache_dir": str(tmp / "cache")},
           "train": {"per_device_train_batch_size": 1, "max_steps": 2, "learning_rate": 3e-3},
           "logging": {"logging_steps": 1, "progress_bar": False}, "kernels": {"backend": "torch"}}
    for key, value in extra.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def distsft_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "distsft", *map(str, args)]


def run(cmd, tmp, env=None, **kw):
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=LIMIT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distsft: error:")]


def assert_one_line(proc, code: int, starts: str):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"distsft: error: {starts}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]


def test_input_errors_are_one_line_with_exit_code_2_before_the_model(tmp_path):
    """Regression: a missing data file, a bad resume path or a global batch larger than the dataset were
    14-96-line tracebacks, and a data typo surfaced only after the model was built."""
    run_file = tiny_run_file(tmp_path)
    cases = [
        (["train.learning_rate=abc"], "train.learning_rate: expected a number"),
        (["data.sources=[{path: data/trian.jsonl}]"], "data.sources.0.path: no such file or folder"),
        ([f"checkpoint.resume_from_checkpoint={tmp_path / 'nope'}"], "checkpoint.resume_from_checkpoint: no such"),
        (["train.per_device_train_batch_size=100000"], "train.per_device_train_batch_size: the training set packs"),
    ]
    for overrides, starts in cases:
        proc = run(distsft_cmd("train", "--config", run_file, f"train.output_dir={tmp_path / 'out'}", *overrides),
                   tmp_path)
        assert_one_line(proc, 2, starts)
        assert " model: " not in proc.stderr  # refused before the model was built
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_launcher_keeps_the_trainers_exit_codes_and_one_line(tmp_path):
    """Regression: under a launcher the one-line error became a traceback with exit 1, and preemption's
    requeue code 75 became 143. `distsft train --nproc_per_node 2`: an input error found in the ranks is one
    line and 2, divergence 65, SIGTERM to the launcher a committed checkpoint and 75."""
    run_file = tiny_run_file(tmp_path)
    launch = ["train", "--nproc_per_node", 2, "--config", run_file]

    too_big = run(distsft_cmd(*launch, f"train.output_dir={tmp_path / 'big'}",
                              "train.per_device_train_batch_size=100000"), tmp_path)
    assert_one_line(too_big, 2, "train.per_device_train_batch_size: the training set packs")

    diverged = run(distsft_cmd(*launch, f"train.output_dir={tmp_path / 'nan'}", "distributed.nonfinite_loss=abort"),
                   tmp_path, env={"DISTSFT_TEST_FAULT": "nan_loss@1@1"})
    assert_one_line(diverged, 65, "step 1: 1 non-finite step")

    out = tmp_path / "preempt"
    proc = subprocess.Popen(distsft_cmd(*launch, f"train.output_dir={out}", "train.max_steps=100000"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + LIMIT
        while not ((out / "metrics.jsonl").exists() and '"train/loss"' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    assert error_lines(stderr) == [] and "Traceback" not in stderr, stderr[-3000:]
    (ckpt,) = (out / "checkpoints").iterdir()
    verify(ckpt)


def test_single_process_sigterm_exits_75(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(distsft_cmd("train", "--config", tiny_run_file(tmp_path), f"train.output_dir={out}",
                                        "train.max_steps=100000"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + LIMIT
        while not ((out / "metrics.jsonl").exists() and '"train/loss"' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr[-3000:]
    (ckpt,) = (out / "checkpoints").iterdir()
    verify(ckpt)


def test_no_run_is_overwritten(tmp_path, monkeypatch):
    """Regression: every run defaulted to outputs/demo and a second run replaced the first one's adapter and
    summary, appended to its metrics.jsonl (the replot cut its curve) and, failing, overwrote its config.
    An explicit directory holding a run is refused with nothing written; a default one moves to `-2`."""
    monkeypatch.chdir(tmp_path)
    run_file = tiny_run_file(tmp_path)
    first = tmp_path / "first"
    from distsft.config import load_config

    distsft.train(load_config(run_file, [f"train.output_dir={first}"]))
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"^train\.output_dir: .*first already holds a finished run"):
        distsft.train(load_config(run_file, [f"train.output_dir={first}", "train.learning_rate=1e-4"]))
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == before

    distsft.train(load_config(run_file))  # default: outputs/<model directory's name>
    distsft.train(load_config(run_file))
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["model", "model-2"]
    assert (tmp_path / "outputs" / "model-2" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    from distsft.config import load_config

    distsft.train(load_config(tiny_run_file(tmp), [f"train.output_dir={tmp / 'out'}"]))
    return tmp


def test_help_lists_every_key_with_defaults_and_docstrings(tmp_path):
    proc = run(distsft_cmd("train", "--help"), tmp_path)
    assert proc.returncode == 0
    text = proc.stdout
    from dataclasses import fields

    from distsft.config import Config

    for section in fields(Config):
        for f in fields(section.default_factory()):
            assert f"  {section.name}.{f.name} = " in text, f"{section.name}.{f.name}"
    assert "train.learning_rate = 0.001   (with model.name_or_path: 0.0002)" in text
    assert "Peak learning rate." in text and "data.sources.N.path = (required)" in text
    top = run(distsft_cmd(), tmp_path)
    assert top.returncode == 2 and all(c in top.stdout for c in ("train", "merge", "generate", "chat", "env"))
    assert_one_line(run(distsft_cmd("trian"), tmp_path), 2, "unknown command 'trian'")


def test_print_config_is_the_resolved_config(tmp_path):
    from distsft.config import load_config

    proc = run(distsft_cmd("train", "--print-config", "model.name_or_path=org/some-model", "lora.r=8"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "printed.yaml").write_text(proc.stdout)
    printed = load_config(tmp_path / "printed.yaml")
    assert printed.lora.r == 8 and printed.train.learning_rate == 2e-4 and printed.data.max_seq_len == 2048
    assert printed.train.output_dir == "outputs/some-model" and printed.checkpoint.save_steps == 500


def test_merge_generate_plot_env(trained):
    out = trained / "out"
    merged = trained / "merged"
    proc = run(distsft_cmd("merge", out / "adapter", merged), trained)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert_one_line(run(distsft_cmd("merge", out / "adapter", merged), trained), 2, f"{merged}: exists")
    assert_one_line(run(distsft_cmd("merge", trained / "nowhere", trained / "m2"), trained), 2, "")

    proc = run(distsft_cmd("generate", out / "adapter", "--prompt", "What is 2 + 3?", "--max-new-tokens", 8), trained)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(">>> What is 2 + 3?\n")
    assert "FutureWarning" not in proc.stderr and "Traceback" not in proc.stderr

    (out / "training_curves.png").unlink()
    proc = run(distsft_cmd("plot", out), trained)
    assert proc.returncode == 0 and (out / "training_curves.png").stat().st_size > 1000

    proc = run(distsft_cmd("env"), trained)
    import torch

    assert proc.returncode == 0 and torch.__version__ in proc.stdout and "distsft" in proc.stdout


def test_merged_model_equals_base_plus_adapter(trained):
    """`distsft merge` (what a ZeRO-3 run's adapter goes through too: it is exported whole)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distsft.export import load_adapted, merge_adapter

    out = trained / "out"
    merged_dir = merge_adapter(out / "adapter", trained / "merged-fn")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    adapted, _ = load_adapted(out / "adapter")
    ids = torch.randint(5, 2000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (out / "base").resolve())
