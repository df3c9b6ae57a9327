"""Every accelerate YAML and DeepSpeed JSON loads, holds one scenario with its launch command, and leaves
the values the trainer owns to the trainer ("auto")."""

import json
import subprocess

import pytest
import yaml
from _support import REPO

TRAINER_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping")
MODES = ("single_gpu", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "multi_node")


@pytest.mark.parametrize("name", MODES)
def test_accelerate_config(name):
    path = REPO / "accelerate_configs" / f"{name}.yaml"
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"accelerate launch --config_file accelerate_configs/{name}.yaml" in line for line in header)
    cfg = yaml.safe_load(text)
    if cfg["distributed_type"] == "DEEPSPEED":
        ds_path = REPO / cfg["deepspeed_config"]["deepspeed_config_file"]
        assert ds_path.is_file(), ds_path
        assert cfg["deepspeed_config"]["zero3_init_flag"] == ("zero3" in ds_path.name)
    assert (cfg["num_machines"] > 1) == (name == "multi_node")


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_config(path):
    cfg = json.loads(path.read_text())
    for key in TRAINER_OWNED:
        assert cfg[key] == "auto", key
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the trainer passes its own
    stage = cfg["zero_optimization"]["stage"]
    assert f"zero{stage}" in path.name
    offload = "offload_optimizer" in cfg["zero_optimization"]
    assert offload == ("offload" in path.name)
    if offload:
        assert cfg["zero_force_ds_cpu_optimizer"] is False  # lets the trainer's torch AdamW run offloaded


def test_deepspeed_config_refuses_a_disagreeing_batch_size(tmp_path):
    from types import SimpleNamespace

    import torch

    from distsft.distributed import configure_deepspeed

    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["gradient_accumulation_steps"] = 4
    acc = SimpleNamespace(distributed_type="DEEPSPEED", num_processes=2,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        configure_deepspeed(acc, micro_batch=1, accum=2, max_grad_norm=1.0, dtype=torch.float32)
    ds["gradient_accumulation_steps"] = "auto"
    configure_deepspeed(acc, micro_batch=2, accum=3, max_grad_norm=0.5, dtype=torch.bfloat16)
    assert (ds["train_batch_size"], ds["gradient_clipping"], ds["bf16"]["enabled"]) == (12, 0.5, True)
    assert ds["timers"] == {"throughput": {"enabled": False}}  # no device synchronisation per forward and step
    ds["timers"] = {"throughput": {"enabled": True, "synchronized": False}}
    configure_deepspeed(acc, micro_batch=2, accum=3, max_grad_norm=0.5, dtype=torch.bfloat16)
    assert ds["timers"] == {"throughput": {"enabled": True, "synchronized": False}}  # the JSON's own choice stays


@pytest.mark.parametrize("script", ["multinode.sh", "slurm.sbatch"])
def test_launch_scripts_parse_and_name_their_command(script):
    path = REPO / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    header = "\n".join(line for line in path.read_text().splitlines()[:12] if line.startswith("#"))
    assert ("bash launch/multinode.sh" if script == "multinode.sh" else "sbatch") in header


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_run_configs_load(path):
    from distsft.config import load_config

    cfg = load_config(path)
    assert f"--config launch/configs/{path.name}" in path.read_text()
    assert cfg.train.output_dir is None if path.name == "demo.yaml" else cfg.train.output_dir.startswith("outputs/")


def test_a_recipe_per_supported_family():
    """Llama-3.1-8B, Qwen2.5, Qwen3, Mistral and Gemma-2 each have a recipe naming that model, in bf16, with
    a real-run learning rate, resumable checkpoints and the attention implementation the family needs."""
    from distsft.config import load_config

    recipes = {p.name: load_config(p) for p in (REPO / "launch" / "configs").glob("*.yaml") if p.name != "demo.yaml"}
    models = {cfg.model.name_or_path: name for name, cfg in recipes.items()}
    for family in ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-", "Qwen/Qwen3-", "mistralai/Mistral-", "google/gemma-2-"):
        assert any(m.startswith(family) for m in models), family
    for name, cfg in recipes.items():
        assert cfg.model.dtype == "bfloat16" and 5e-5 <= cfg.train.learning_rate <= 3e-4, name
        assert cfg.checkpoint.save_steps > 0 and cfg.checkpoint.resume_from_checkpoint == "auto", name
        assert cfg.model.attn_implementation == ("eager" if "gemma-2" in cfg.model.name_or_path else "auto"), name
