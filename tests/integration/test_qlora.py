"""QLoRA on CPU (bitsandbytes' CPU backend): 4-bit loading, training, adapter-sized checkpoints, adapter
reload, merged export parity, the up-front errors, and a random init quantized while it is drawn."""

import json

import pytest
import torch

import distsft
from distsft.config import ModelConfig, load_config

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
    from distsft.model import load_base_model

    cfg = ModelConfig(name_or_path=str(tmp / "model"), dtype="float32", attn_implementation="eager",
                      load_in_4bit=True)
    return load_base_model(cfg, torch.device("cpu"), seed=0)


def test_adapter_reload_and_merged_export_match(run):
    """The merged export (dequantize, add B@A, plain fp32/bf16 linears) against the adapter on the 4-bit
    base. Stated tolerance: 2 x bitsandbytes' own deviation (its 4-bit matmul against the same dequantized
    weights in full precision, measured here on the base model) + 1e-4. Regression: bitsandbytes repacks a
    CPU 4-bit weight in place at its first eval forward (on AVX512-BF16 CPUs, unless our loader turned it
    off), and dequantizing that layout gave garbage; the untrained model below gets bitsandbytes' default
    back and its eval forward runs before the merge, so it exercises that path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distsft.config import LoraConfig
    from distsft.export import merged_model
    from distsft.model import add_lora

    tmp, out, _ = run
    base = _quantized_base(tmp)
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    untrained = add_lora(_quantized_base(tmp), LoraConfig(r=8)).eval()  # B = 0: the plain 4-bit base
    for layer in untrained.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    ids = torch.randint(5, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        q = untrained(input_ids=ids).logits
        d = merged_model(untrained)(input_ids=ids).logits  # the same base, dequantized to fp32
    bnb_error = float((q - d).abs().max())
    assert float((m - a).abs().max()) <= 2 * bnb_error + 1e-4
    assert float((a - q).abs().max()) > 10 * (2 * bnb_error + 1e-4)  # the adapter's effect is far larger


def test_gradients_flow_through_4bit_layers_after_an_eval_forward(run):
    """Regression: on an AVX512-BF16 CPU, bitsandbytes' eval forward without grad (our packing self-check
    runs one before training) repacked every 4-bit weight for its inference kernel, whose op has no
    autograd: from then on no gradient reached anything below a 4-bit layer, silently (q/k/v/gate/up LoRA
    B got exactly zero at the first step, only o_proj/down_proj learned). Our loader keeps the training
    layout: after an eval forward the gradients are those of a model that never ran one."""
    from distsft.config import KernelsConfig, LoraConfig
    from distsft.model import build_model

    tmp, _, _ = run
    ids = torch.randint(5, 2000, (1, 24), generator=torch.Generator().manual_seed(0))

    def grads(eval_first: bool) -> dict:
        torch.manual_seed(0)  # peft draws LoRA A from the global generator
        model, _ = build_model(ModelConfig(name_or_path=str(tmp / "model"), dtype="float32",
                                           attn_implementation="eager", load_in_4bit=True),
                               LoraConfig(r=8), KernelsConfig(backend="torch"), torch.device("cpu"), seed=0)
        if eval_first:
            model.eval()
            model.logits(ids)
            model.train()
        model(ids, ids)[0].backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = grads(False), grads(True)
    q_b = next(n for n in fresh if "layers.1.self_attn.q_proj.lora_B" in n)
    assert float(fresh[q_b].abs().sum()) > 0  # reaches q_proj only through o_proj's 4-bit matmul
    assert all(torch.equal(fresh[n], after_eval[n]) for n in fresh)


def _torchrun(tmp, name, cfg):
    """Train `cfg` on 2 CPU ranks (gloo; DeepSpeed on its CPU accelerator)."""
    import os
    import sys
    from pathlib import Path

    from _support import REPO, run_with_progress

    cfg.save(tmp / f"{name}.yaml")
    # no fixed total: a launch fails when it stops printing and writing for 5 minutes (a hang)
    proc = run_with_progress([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(REPO / "distsft" / "train.py"), "--config", str(tmp / f"{name}.yaml")],
                             cwd=tmp, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                             watch=Path(cfg.train.output_dir), idle_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out):
    return {r["step"]: r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}


def test_qlora_under_zero2_on_two_ranks(run):
    """The 4-bit base replicated, the adapter's optimizer state sharded: trains, and every rank writes its
    own shard of a non-empty adapter state."""
    from _support import REPO
    from safetensors.torch import load_file

    tmp, _, _ = run
    out = tmp / "zero2"
    _torchrun(tmp, "zero2", qlora_config(tmp, out, **{
        "train.per_device_train_batch_size": 1, "train.max_steps": 4, "checkpoint.save_steps": 4,
        "checkpoint.save_merged": "false", "distributed.deepspeed_config": REPO / "ds_configs" / "zero2.json",
        "distributed.zero12": "deepspeed"}))
    shards = sorted((out / "checkpoints" / "step-00000004" / "shards").glob("rank-*.safetensors"))
    assert [p.name for p in shards] == ["rank-00000.safetensors", "rank-00001.safetensors"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained


ZERO3_ATOL = 2e-5  # loss and adapter, ZeRO-3 on 2 ranks vs one process (fp32; only summation order differs)


def test_qlora_under_zero3_on_two_ranks(run):
    """ZeRO-3 partitions the 4-bit weights themselves (stored in the model dtype; persistence threshold 0
    so that every one is sharded) and trains the same run as one process: the same global batch gives the
    same losses and the same adapter within ZERO3_ATOL; the exported adapter is not empty and is exactly
    the trained parameters held in the final checkpoint's rank shards.

    Regression: bitsandbytes' CPU backend repacked each weight in place at the first eval forward (the
    packing self-check), so under ZeRO-3 the next gather paired the original bytes with the repacked
    quant_state and the self-check failed; `qlora.keep_4bit_training_layout` stops the repack."""
    from _support import REPO
    from safetensors.torch import load_file

    from distsft.checkpoint import assemble

    tmp, single_out, _ = run
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3_all_partitioned.json").write_text(json.dumps(ds))
    out = tmp / "zero3"
    _torchrun(tmp, "zero3", qlora_config(tmp, out, **{  # global batch 1 x 2 x 2 ranks = the run's 2 x 2
        "train.per_device_train_batch_size": 1, "checkpoint.save_merged": "false",
        "distributed.deepspeed_config": tmp / "zero3_all_partitioned.json"}))

    single, zero3 = _losses(single_out), _losses(out)
    assert single.keys() == zero3.keys() == set(range(1, 7))
    assert max(abs(single[s] - zero3[s]) for s in single) <= ZERO3_ATOL, (single, zero3)

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained
    frags = []
    for index in sorted((out / "checkpoints" / "step-00000006" / "shards").glob("rank-*.json")):
        tensors = load_file(str(index.with_suffix(".safetensors")))
        frags += [{**e, "tensors": {k: tensors[f"{k}/{e['name']}"] for k in e["keys"]}}
                  for e in json.loads(index.read_text())]
    trained = {name.removeprefix("peft_model.").replace(".default.", "."): entry["tensors"]["param"]
               for name, entry in assemble(frags).items()}
    assert len(frags) > len(trained)  # each parameter's fragments came from both ranks
    assert trained.keys() == adapter.keys()
    assert all(torch.equal(adapter[k], trained[k]) for k in adapter)
    reference = load_file(str(single_out / "adapter" / "adapter_model.safetensors"))
    assert max(float((adapter[k] - reference[k]).abs().max()) for k in adapter) <= ZERO3_ATOL


def _census(out) -> dict:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return next(r for r in records if r.get("event") == "kernels")


def test_fused_qlora_under_zero3_matches_one_process(run):
    """Issue 18: under ZeRO-3 the fused LoRA projections and our 4-bit dequantization kernel run on every
    rank (before, any weight carrying a `ds_id` sent every LoRA layer back to peft's forward, silently,
    while the kernel report still counted them). Whole decoder layers are gathered before their forward
    and backward, so the 4-bit bytes (stored in the model dtype, partitioned: persistence threshold 0)
    are whole when dequantized; the first step's kernel census shows every patched kernel ran ours on
    both ranks, and the losses are the one-process fused run's."""
    from _support import REPO

    tmp, _, _ = run
    fused = {"kernels.backend": "auto", "checkpoint.save_merged": "false", "checkpoint.save_steps": 0,
             "train.max_steps": 3}  # the interpreter's kernels are slow: 3 steps check the backward too
    single_out = tmp / "fused_single"
    distsft.train(qlora_config(tmp, single_out, **fused))
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3_fused.json").write_text(json.dumps(ds))
    out = tmp / "zero3_fused"
    _torchrun(tmp, "zero3_fused", qlora_config(tmp, out, **fused, **{
        "train.per_device_train_batch_size": 1, "distributed.deepspeed_config": tmp / "zero3_fused.json"}))
    for census in (_census(single_out), _census(out)):
        assert census["missing"] == {} and not census["fallbacks"], census
        assert census["ran"]["lora"] == {"fused": 14} and census["ran"]["dequantize_4bit"] == {"triton": 14}, census
    assert _census(out).get("ranks_short") is None  # rank 1 ran ours too
    single, zero3 = _losses(single_out), _losses(out)
    assert single.keys() == zero3.keys() == set(range(1, 4))
    assert max(abs(single[s] - zero3[s]) for s in single) <= ZERO3_ATOL, (single, zero3)


def test_qlora_zero3_checkpoint_resumes_in_one_process(run):
    """A 4-bit ZeRO-3 run on 2 ranks checkpoints at step 3; one process without DeepSpeed resumes from it
    (another world size and stage, no conversion): steps 4-6 are the uninterrupted single run's."""
    import shutil

    from _support import REPO

    tmp, single_out, _ = run
    out = tmp / "zero3_resume"
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3_resume.json").write_text(json.dumps(ds))
    _torchrun(tmp, "zero3_resume", qlora_config(tmp, out, **{
        "train.per_device_train_batch_size": 1, "checkpoint.save_steps": 3, "checkpoint.save_merged": "false",
        "distributed.deepspeed_config": tmp / "zero3_resume.json"}))
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # as if the job had died after step 3's save
    (out / "metrics.jsonl").unlink()
    result = distsft.train(qlora_config(tmp, out, **{"checkpoint.resume_from_checkpoint": "auto",
                                                      "checkpoint.save_steps": 3, "checkpoint.save_merged": "false"}))
    assert result is not None
    single, resumed = _losses(single_out), _losses(out)
    assert set(resumed) == {4, 5, 6}, resumed
    assert max(abs(single[s] - resumed[s]) for s in resumed) <= ZERO3_ATOL, (single, resumed)


def test_zero3_quantization_settings_and_errors(monkeypatch, run, tmp_path):
    """Under ZeRO-3 the 4-bit storage is the model dtype; another storage dtype, or a checkpoint that is
    already quantized, stops with a clear error before any weight is loaded."""
    from transformers import AutoModelForCausalLM

    import distsft.model as model_module

    tmp, _, _ = run
    _quantized_base(tmp).save_pretrained(tmp_path / "prequantized")
    monkeypatch.setattr(model_module, "_zero3", lambda: True)
    cpu = torch.device("cpu")
    kwargs = model_module._quantization_kwargs(ModelConfig(name_or_path=str(tmp / "model"), load_in_4bit=True),
                                               torch.bfloat16, cpu)
    assert kwargs["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
    with pytest.raises(ValueError, match="model.bnb_4bit_quant_storage: under ZeRO-3"):
        model_module._quantization_kwargs(ModelConfig(name_or_path=str(tmp / "model"), load_in_4bit=True,
                                                      bnb_4bit_quant_storage="uint8"), torch.bfloat16, cpu)
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    for load_in_4bit in (True, False):  # transformers would load it 4-bit either way
        cfg = ModelConfig(name_or_path=str(tmp_path / "prequantized"), load_in_4bit=load_in_4bit)
        with pytest.raises(ValueError, match="already quantized, which is not supported under ZeRO-3"):
            model_module.load_base_model(cfg, cpu, seed=0)
    assert not loads


# ----------------------------------------------------------------------------------------------------
# Random init quantized while it is drawn (`model.init_from_config` + `model.load_in_4bit`)


def _random_4bit_config(cfg_dir, **extra):
    return ModelConfig(init_from_config=str(cfg_dir), dtype="float32", attn_implementation="eager",
                       load_in_4bit=True, **extra)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    from _support import write_tiny_llama

    tmp = tmp_path_factory.mktemp("qlora_random")
    write_tiny_llama(tmp / "cfg")
    out = tmp / "out"
    cfg = qlora_config(tmp, out, **{"model.name_or_path": "null", "model.init_from_config": tmp / "cfg",
                                    "train.learning_rate": 1e-2})
    assert cfg.model.name_or_path is None and cfg.model.load_in_4bit
    return tmp, out, distsft.train(cfg)


def test_random_init_4bit_trains_with_a_falling_loss(random_run):
    """The whole pipeline on a random model quantized while drawn: LoRA, kernels patched, adapter-sized
    checkpoint, adapter export and the merged (dequantized) export."""
    from transformers import AutoModelForCausalLM

    _, out, result = random_run
    losses = _losses(out)
    assert result.global_step == 6 and losses[6] < losses[1] - 0.05, losses
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())


def _reference_full_precision(cfg_dir, seed):
    """The same random model in full precision, drawn unit by unit with the loader's seeds: what the
    loader would have quantized had it built everything first."""
    import zlib

    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.qlora import _init_units

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir), dtype=torch.float32,
                                             attn_implementation="eager")
    with torch.no_grad():
        for name, unit, owner, whole in _init_units(model):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            for module in reversed(list(unit.modules()) if whole else [unit]):
                owner._init_weights(module)
    return model


def test_random_init_4bit_is_what_from_pretrained_would_quantize(tmp_path):
    """Linear4bit where from_pretrained puts it (every decoder linear; not the LM head), the attributes
    peft reads, and bitwise the 4-bit weights, quant states and full-precision tensors that
    `from_pretrained(quantization_config=...)` gives for the same weights saved in full precision."""
    from _support import write_tiny_llama
    from transformers import AutoModelForCausalLM

    from distsft.model import _quantization_kwargs, load_base_model

    cfg_dir = write_tiny_llama(tmp_path / "cfg", num_hidden_layers=3)
    cfg = _random_4bit_config(cfg_dir)
    model = load_base_model(cfg, torch.device("cpu"), seed=7)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 3 * 7 and all(".layers." in n for n in quantized)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.is_loaded_in_4bit and model.is_quantized and model.hf_quantizer is not None
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"

    _reference_full_precision(cfg_dir, seed=7).save_pretrained(tmp_path / "full")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32, attn_implementation="eager",
                                               **_quantization_kwargs(cfg, torch.float32, torch.device("cpu")))
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_random_init_4bit_is_the_same_on_every_rank(tmp_path, monkeypatch):
    """Same seed -> bitwise the same 4-bit model whatever the process drew before or which rank it is (DDP
    ranks start from one model); another seed -> another model."""
    from _support import write_tiny_llama

    from distsft.model import load_base_model

    cfg = _random_4bit_config(write_tiny_llama(tmp_path / "cfg"))
    torch.manual_seed(1)
    a = load_base_model(cfg, torch.device("cpu"), seed=3).state_dict()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    torch.manual_seed(2)
    torch.rand(100)
    b = load_base_model(cfg, torch.device("cpu"), seed=3).state_dict()
    c = load_base_model(cfg, torch.device("cpu"), seed=4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(a[key], c[key])


class _TransientFloatBytes:
    """Records, under a TorchDispatchMode, every floating-point CPU storage that an op creates and when it
    dies; `transient_peak()` is the most bytes alive at once among those that died before the end (the
    loader's temporaries: storages the finished model keeps do not count)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.alive = {}  # storage cdata -> (weak ref, bytes, serial): an address is reused once freed
        self.events = []  # (+bytes | -bytes, serial), in order

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._observe(out)
                return out

        self.mode = Mode()

    def _observe(self, out):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        for key, (ref, size, serial) in list(self.alive.items()):
            if ref.expired():
                del self.alive[key]
                self.events.append((-size, serial))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point():
                storage = t.untyped_storage()
                if storage._cdata not in self.alive:
                    self.alive[storage._cdata] = (StorageWeakRef(storage), storage.nbytes(), len(self.events))
                    self.events.append((storage.nbytes(), len(self.events)))

    def transient_peak(self) -> int:
        kept = {serial for _, _, serial in self.alive.values()}
        now = peak = 0
        for size, serial in self.events:
            if serial not in kept:
                now += size
                peak = max(peak, now)
        return peak


def test_random_init_4bit_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """The loader's full-precision temporaries never exceed ~one decoder layer (here 1/8 of the model's
    linear weights): measured on every storage torch allocates. The control builds the same model with the
    whole model as one unit and must exceed the bound, so the measurement can fail."""
    from _support import write_tiny_llama

    import distsft.model as model_module
    import distsft.qlora as qlora_module

    cfg = _random_4bit_config(write_tiny_llama(tmp_path / "cfg", num_hidden_layers=8, vocab_size=256))
    hidden, inter, q, kv = 64, 128, 4 * 16, 2 * 16  # write_tiny_llama's shape
    layer_bytes = 4 * (hidden * (2 * q + 2 * kv) + 3 * hidden * inter)  # one layer's linears, fp32

    def measure():
        tracker = _TransientFloatBytes()
        with tracker.mode:
            model = model_module.load_base_model(cfg, torch.device("cpu"), seed=0)
        del model
        return tracker.transient_peak()

    per_layer = measure()
    whole_units = lambda model: iter([("", model, model, True)])  # noqa: E731  (the control: all at once)
    monkeypatch.setattr(qlora_module, "_init_units", whole_units)
    all_at_once = measure()
    print(f"\nrandom 4-bit loader: transient fp32 peak {per_layer} B per layer, {all_at_once} B all at once; "
          f"one layer's linears {layer_bytes} B")
    assert per_layer <= 1.25 * layer_bytes
    assert all_at_once > 4 * layer_bytes


@pytest.mark.parametrize("norms", [False, True], ids=["hf-modules", "our-norms-rope-mlp"])
@pytest.mark.parametrize("ours", [True, False], ids=["triton-dequant", "bnb-dequant"])
def test_fused_lora_on_the_4bit_base_matches_peft(run, monkeypatch, ours, norms):
    """kernels.lora on a 4-bit base: the weight dequantized inside our fused node (forward and again in
    backward; by our Triton kernel or by bitsandbytes, `kernels.dequantize_4bit`) against peft's
    bitsandbytes path, on the same quantized model: loss and every LoRA gradient. With our RMSNorm, RoPE
    attention and MLP, the norms before q/k/v and gate/up leave their groups' rank sum of spare columns
    after each row, where the fused path builds [x | mid] without copying x."""
    import copy

    import distsft_kernels as K
    from peft import LoraConfig, get_peft_model

    from distsft.config import KernelsConfig
    from distsft.patching import apply_kernels

    tmp, _, _ = run
    torch.manual_seed(0)
    model = get_peft_model(_quantized_base(tmp), LoraConfig(r=4, target_modules="all-linear",
                                                            init_lora_weights=False))
    peft_ref = copy.deepcopy(model)
    report = apply_kernels(model, KernelsConfig(rms_norm=norms, rope=norms, swiglu=norms, dequantize_4bit=ours))
    assert report.counts["lora"] == 7 * model.config.num_hidden_layers
    if norms:
        from distsft.census import TAG

        layer = model.base_model.model.model.layers[0]
        r = model.peft_config["default"].r
        assert getattr(layer.input_layernorm, TAG).spare_cols == 3 * r
        assert getattr(layer.post_attention_layernorm, TAG).spare_cols == 2 * r
        assert getattr(model.base_model.model.model.norm, TAG).spare_cols == 0
    calls = []
    if K.HAS_TRITON:
        real = K.Dequantizer.__call__
        monkeypatch.setattr(K.Dequantizer, "__call__", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for m in (model, peft_ref):
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # forward 7 per layer; backward 7 per layer but layer 0's q/k/v, whose input (the frozen embedding's,
    # normed) needs no gradient; no recompute here
    expected = 14 * model.config.num_hidden_layers - 3 if ours and K.HAS_TRITON else 0
    assert len(calls) == expected


def test_cached_dequantizer_follows_a_replaced_4bit_weight(run):
    """The fused path keeps one Dequantizer per 4-bit layer (its arguments checked once). Replacing the
    layer's weight (another quantized tensor, its own quant state) must not dequantize the old one."""
    import bitsandbytes as bnb
    import distsft_kernels as K
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize

    from distsft.patching import _Spec
    from distsft.qlora import dequantize_4bit

    if not K.HAS_TRITON:
        pytest.skip("no Triton: bitsandbytes dequantizes, nothing is cached")
    tmp, _, _ = run
    base = _quantized_base(tmp)
    layer = next(m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    spec = _Spec("auto", activation="lora", dequantize_4bit=True)
    w = layer.weight
    first = dequantize_4bit(layer, spec)
    assert torch.equal(first, bnb_dequantize(w.data, w.quant_state).to(first.dtype))
    assert "_distsft_dequantizer" in layer.__dict__
    wide = torch.zeros(first.shape[0], first.shape[1] + 8, dtype=first.dtype)
    assert torch.equal(dequantize_4bit(layer, spec, out=wide[:, :first.shape[1]]), first)  # the cached one
    # a different weight of the same shape, quantized on its own
    other = bnb.nn.Params4bit(torch.randn(first.shape) * 3, requires_grad=False, quant_type=w.quant_type,
                              compress_statistics=w.compress_statistics, blocksize=w.blocksize,
                              quant_storage=w.quant_storage)._quantize(w.device)
    layer.weight = other
    second = dequantize_4bit(layer, spec)
    assert torch.equal(second, bnb_dequantize(other.data, other.quant_state).to(second.dtype))
    assert not torch.equal(second, first)
