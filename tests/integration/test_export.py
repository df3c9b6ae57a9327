"""What a run leaves behind, on tiny models: `lora.modules_to_save`, tied embeddings, an adapter the
standard one-liners load (AutoPeftModelForCausalLM, `distsft merge`), its model card, and a
`datasets.Dataset` inside a dict config."""

import json

import pytest
import torch
from _support import write_tiny_llama
from safetensors.torch import load_file

import distsft
from distsft.config import KernelsConfig, LoraConfig, ModelConfig, TrainConfig, load_config
from distsft.loss import select_loss_fn

pytestmark = pytest.mark.integration
CPU = torch.device("cpu")
LOSS = select_loss_fn(KernelsConfig(backend="torch"))  # the reference loss (these tests read logits)


def run_config(tmp, model_dir, out, **extra):
    o = {"model.init_from_config": model_dir, "model.tokenizer": "builtin:tiny-llama", "model.dtype": "float32",
         "model.attn_implementation": "eager", "lora.r": 4, "data.max_seq_len": 256, "data.cache_dir": tmp / "cache",
         "train.output_dir": out, "train.per_device_train_batch_size": 2, "train.max_steps": 2,
         "train.learning_rate": 1e-2, "logging.logging_steps": 1, "logging.progress_bar": "false",
         "kernels.backend": "torch", "checkpoint.save_steps": 2}
    o.update(extra)
    return load_config(overrides=[f"{k}={v}" for k, v in o.items()])


def model_cfg(model_dir):
    return ModelConfig(init_from_config=str(model_dir), dtype="float32", attn_implementation="eager")


def restored(model_dir, out, lora: LoraConfig):
    """The trained model, rebuilt and restored from the run's final checkpoint (the reference)."""
    from distsft.checkpoint import load_checkpoint
    from distsft.model import CausalLMWithLoss, add_lora, load_base_model
    from distsft.optim import build_optimizer

    model = CausalLMWithLoss(add_lora(load_base_model(model_cfg(model_dir), CPU, seed=42), lora), LOSS)
    opt = build_optimizer(model, TrainConfig(), CPU)
    load_checkpoint(out / "checkpoints" / "step-00000002", model=model, optimizer=opt, scheduler=None)
    return model.eval()


def reloaded(model_dir, adapter_dir):
    from peft import PeftModel

    from distsft.model import CausalLMWithLoss, load_base_model

    base = load_base_model(model_cfg(model_dir), CPU, seed=42)
    return CausalLMWithLoss(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), LOSS)


IDS = torch.randint(5, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_modules_to_save_checkpoints_and_exports(tmp_path, module):
    """Regression: `lora.modules_to_save` crashed at the first checkpoint and at the export with
    KeyError 'modules_to_save.default.weight': the adapter state dict, already filtered by peft, was passed
    back into save_pretrained(state_dict=...), which filtered it again."""
    model_dir = write_tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    distsft.train(run_config(tmp_path, model_dir, out, **{"lora.modules_to_save": f"[{module}]"}))
    from distsft.checkpoint import verify

    verify(out / "checkpoints" / "step-00000002")
    for adapter in (out / "adapter", out / "checkpoints" / "step-00000002" / "adapter"):
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        full = [k for k in saved if module in k]
        assert len(full) == 1 and saved[full[0]].shape == (2048, 64), sorted(saved)
    trained = restored(model_dir, out, LoraConfig(r=4, modules_to_save=[module]))
    assert torch.equal(reloaded(model_dir, out / "adapter").logits(IDS), trained.logits(IDS))
    base = load_file(str(out / "base" / "model.safetensors"))
    base_key = "lm_head.weight" if module == "lm_head" else "model.embed_tokens.weight"
    assert not torch.equal(saved[full[0]], base[base_key])  # the module was trained


def test_tied_embeddings_stay_tied_and_the_adapter_stays_adapter_sized(tmp_path):
    """Tied input embedding and LM head (SmolLM2, Gemma, Qwen2.5-0.5B, Llama-3.2-1B). Plain LoRA: neither is
    trained, the adapter holds LoRA weights only (no embedding table, which peft's save_embedding_layers=
    "auto" can add), and the merged model keeps the tie. `modules_to_save: [lm_head]`: peft would train a
    copy of the head alone and break the tie; distsft trains the one shared matrix, and the merged model,
    saved and reloaded, still ties it and gives the adapter's logits."""
    from distsft.export import merge_adapter
    from distsft.model import trainable_parameter_count

    model_dir = write_tiny_llama(tmp_path / "model", tie_word_embeddings=True)
    vocab_matrix = 2048 * 64

    plain = tmp_path / "plain"
    distsft.train(run_config(tmp_path, model_dir, plain))
    saved = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)
    lora_numel = sum(t.numel() for t in saved.values())
    assert lora_numel < vocab_matrix and (plain / "adapter" / "adapter_model.safetensors").stat().st_size < (
        4 * lora_numel + 64 * 1024)
    trained = restored(model_dir, plain, LoraConfig(r=4))
    assert trainable_parameter_count(trained)[0] == lora_numel

    tied = tmp_path / "tied"
    distsft.train(run_config(tmp_path, model_dir, tied, **{"lora.modules_to_save": "[lm_head]"}))
    trained = restored(model_dir, tied, LoraConfig(r=4, modules_to_save=["lm_head"]))
    lm = trained.causal_lm
    assert trained.lm_head().weight is lm.get_input_embeddings().modules_to_save["default"].weight  # one matrix
    assert trainable_parameter_count(trained)[0] == lora_numel + vocab_matrix
    saved = load_file(str(tied / "adapter" / "adapter_model.safetensors"))
    head = [k for k in saved if "lm_head" in k or "embed_tokens" in k]
    assert len(head) == 2 and torch.equal(saved[head[0]], saved[head[1]])  # both names, one value
    shards = load_file(str(next((tied / "checkpoints" / "step-00000002" / "shards").glob("*.safetensors"))))
    assert sum(1 for k, t in shards.items() if k.startswith("param/") and t.numel() == vocab_matrix) == 1
    assert torch.equal(reloaded(model_dir, tied / "adapter").logits(IDS), trained.logits(IDS))

    from transformers import AutoModelForCausalLM

    for run in (plain, tied):
        merged_dir = merge_adapter(run / "adapter", run / "merged-offline")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied after save and reload
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=IDS).logits, reloaded(model_dir, run / "adapter").logits(IDS),
                                       rtol=1e-4, atol=1e-4)


def test_random_init_adapter_loads_with_auto_peft_and_has_a_model_card(tmp_path):
    """Regression: AutoPeftModelForCausalLM.from_pretrained(outputs/demo/adapter) failed, its
    base_model_name_or_path naming a directory with a config and no weights. The run now writes the
    random-init base to <output_dir>/base and the adapter names it; the card says what trained on what."""
    from peft import AutoPeftModelForCausalLM

    from distsft.model import CausalLMWithLoss

    model_dir = write_tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    distsft.train(run_config(tmp_path, model_dir, out))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    auto = CausalLMWithLoss(AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter")).eval(), LOSS)
    reference = reloaded(model_dir, out / "adapter")
    a, b = auto.peft_model.state_dict(), reference.peft_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the very weights that trained
    # (the saved base runs sdpa, the reference eager: the same logits up to summation order)
    torch.testing.assert_close(auto.logits(IDS), reference.logits(IDS), rtol=1e-5, atol=1e-5)
    card = (out / "adapter" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    for words in (str(model_dir), "random init", "seed 42", "builtin:gsm8k-demo", "| optimizer steps | 2 ",
                  "r 4, alpha 32", "AutoPeftModelForCausalLM"):
        assert words in card, words
    assert load_config(out / "adapter" / "distsft_config.yaml").lora.r == 4


def test_dataset_inside_a_dict_config(tmp_path):
    """Regression: distsft.train({...}) refused a `datasets.Dataset` as a source although the README says
    it is supported ("expected a string")."""
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}"} for i in range(40)]
    ds = datasets.Dataset.from_list(rows)
    model_dir = write_tiny_llama(tmp_path / "model")
    common = {"model": {"init_from_config": str(model_dir), "tokenizer": "builtin:tiny-llama", "dtype": "float32",
                        "attn_implementation": "eager"},
              "train": {"max_steps": 1, "per_device_train_batch_size": 1}, "kernels": {"backend": "torch"},
              "logging": {"progress_bar": False}}
    for i, sources in enumerate(([{"path": ds}], [ds])):
        out = distsft.train({**common, "data": {"sources": sources, "cache_dir": "none"},
                             "train": {**common["train"], "output_dir": str(tmp_path / f"out{i}")}})
        assert out.global_step == 1
        assert load_config(tmp_path / f"out{i}" / "config.yaml").data.sources[0].path.startswith("memory:")
