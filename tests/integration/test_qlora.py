"""QLoRA on CPU (bitsandbytes' CPU backend): 4-bit loading, training, adapter-sized checkpoints, adapter
reload, merged export parity, and the up-front errors."""

import json

import pytest
import torch

import distsft
from distsft.config import ConfigError, load_config

pytestmark = pytest.mark.integration
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny random Llama saved with save_pretrained: QLoRA quantizes pretrained weights while loading."""
    from _support import write_tiny_llama
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("qlora")
    cfg_dir = write_tiny_llama(tmp / "cfg")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir)).save_pretrained(tmp / "model")
    return tmp


def qlora_config(tmp, out, **extra):
    o = {"model.name_or_path": tmp / "model", "model.tokenizer": "builtin:tiny-llama", "model.dtype": "float32",
         "model.attn_implementation": "eager", "model.load_in_4bit": "true", "lora.r": 8,
         "data.max_seq_len": 256, "data.cache_dir": tmp / "cache", "train.output_dir": out,
         "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 2, "train.max_steps": 6,
         "train.learning_rate": 3e-3, "logging.logging_steps": 1, "logging.progress_bar": "false",
         "kernels.backend": "torch", "checkpoint.save_steps": 6, "checkpoint.save_merged": "true"}
    o.update(extra)
    return load_config(overrides=[f"{k}={v}" for k, v in o.items()])


@pytest.fixture(scope="module")
def run(pretrained):
    out = pretrained / "out"
    result = distsft.train(qlora_config(pretrained, out))
    return pretrained, out, result


def test_qlora_trains_with_a_falling_loss(run):
    _, out, result = run
    losses = {r["step"]: r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in r}
    assert result.global_step == 6 and losses[6] < losses[1] - 0.05, losses


def test_checkpoint_is_adapter_sized(run):
    tmp, out, _ = run
    shards = sum(f.stat().st_size for f in (out / "checkpoints" / "step-00000006" / "shards").glob("*.safetensors"))
    adapter = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    base = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors"))
    print(f"\nQLoRA checkpoint shards {shards} B, adapter {adapter} B, base model {base} B (never written)")
    assert 2.5 * adapter < shards < 3.5 * adapter  # parameters + two Adam moments, fp32


def _quantized_base(tmp):
    from distsft.config import ModelConfig
    from distsft.model import load_base_model

    cfg = ModelConfig(name_or_path=str(tmp / "model"), dtype="float32", attn_implementation="eager",
                      load_in_4bit=True)
    return load_base_model(cfg, torch.device("cpu"), seed=0)


def test_adapter_reload_and_merged_export_match(run):
    """The merged export (dequantize, add B@A, plain fp32/bf16 linears) against the adapter on the 4-bit
    base. Stated tolerance: 2 x bitsandbytes' own deviation (its 4-bit matmul against the same dequantized
    weights in full precision, measured here on the base model) + 1e-4. Regression: bitsandbytes repacks a
    CPU 4-bit weight in place at its first eval forward, and dequantizing that layout gave garbage; the
    eval forwards below run before the merge, so they exercise it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distsft.config import LoraConfig
    from distsft.model import add_lora, merged_model

    tmp, out, _ = run
    base = _quantized_base(tmp)
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    untrained = add_lora(_quantized_base(tmp), LoraConfig(r=8)).eval()  # B = 0: the plain 4-bit base
    ids = torch.randint(5, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        q = untrained(input_ids=ids).logits
        d = merged_model(untrained)(input_ids=ids).logits  # the same base, dequantized to fp32
    bnb_error = float((q - d).abs().max())
    assert float((m - a).abs().max()) <= 2 * bnb_error + 1e-4
    assert float((a - q).abs().max()) > 10 * (2 * bnb_error + 1e-4)  # the adapter's effect is far larger


def test_qlora_needs_a_pretrained_model():
    with pytest.raises(ConfigError, match="model.load_in_4bit: .*name_or_path"):
        load_config(overrides=["model.load_in_4bit=true"])


def test_qlora_under_zero2_on_two_ranks(run):
    """The 4-bit base replicated, the adapter's optimizer state sharded: trains, and every rank writes its
    own shard of a non-empty adapter state."""
    import os
    import subprocess
    import sys

    from _support import REPO

    tmp, _, _ = run
    out = tmp / "zero2"
    cfg = qlora_config(tmp, out, **{"train.per_device_train_batch_size": 1, "train.max_steps": 4,
                                    "checkpoint.save_steps": 4, "checkpoint.save_merged": "false",
                                    "distributed.deepspeed_config": REPO / "ds_configs" / "zero2.json"})
    cfg.save(tmp / "zero2.yaml")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "distsft" / "train.py"), "--config", str(tmp / "zero2.yaml")],
                          cwd=tmp, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted((out / "checkpoints" / "step-00000004" / "shards").glob("rank-*.safetensors"))
    assert [p.name for p in shards] == ["rank-00000.safetensors", "rank-00001.safetensors"]
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained


def test_qlora_is_refused_under_zero3(monkeypatch, run):
    import distsft.model as model_module
    from distsft.config import ModelConfig

    tmp, _, _ = run
    monkeypatch.setattr(model_module, "_zero3", lambda: True)
    with pytest.raises(ValueError, match="not supported under ZeRO-3"):
        model_module._quantization_kwargs(ModelConfig(name_or_path=str(tmp / "model"), load_in_4bit=True),
                                          torch.float32, torch.device("cpu"))
