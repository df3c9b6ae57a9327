"""What a run leaves for people and other tools: the PEFT adapter (loadable by the standard one-liners), its
model card, the random-init base an adapter belongs to, and merged models (4-bit bases dequantized first).

    state = adapter_state_dict(wrapper, is_main)                   # every rank (the ZeRO-3 gather); main: tensors
    export_adapter(peft_model, state, out / "adapter", cfg=cfg, tokenizer=tok, device=device, ...)
    export_merged(peft_model, tokenizer, out / "merged")           # checkpoint.save_merged
    merge_adapter("outputs/demo/adapter", "outputs/demo/merged")   # `distsft merge`, after any run

An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` (PEFT's format), the
tokenizer, `README.md` (a model card: what was trained on what) and `distsft_config.yaml` (the run's
resolved config, which `distsft merge` and `distsft generate` read to rebuild the base as it was trained).

A random-init base (`model.init_from_config`: the embedded demo, tests) exists nowhere on disk, so its
adapter's `base_model_name_or_path` would name a directory with a config and no weights. Its weights are
a function of (config, dtype, seed), so the run rebuilds them once at export and writes `<output_dir>/base/`;
the adapter then points there and `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from pathlib import Path

import torch
from torch import nn

from distsft.distributed import gathered_parameters

logger = logging.getLogger(__name__)

CONFIG_FILE = "distsft_config.yaml"
# A random-init base larger than this is not written at export (a benchmark shape, not a model to keep).
MAX_EXPORTED_RANDOM_BASE_PARAMS = 2_000_000_000


def trainable_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors under the peft model's own state-dict names, on CPU: what
    `PeftModel.save_pretrained(state_dict=...)` expects. It filters this itself (LoRA weights,
    `modules_to_save` copies), so it must get the *unfiltered* names: a dict that was already filtered by
    `get_peft_model_state_dict` loses the `modules_to_save.<adapter>.` part of the names, and the second
    filtering fails on it (KeyError: 'modules_to_save.default.weight'). `state_dict` (not
    `named_parameters`) so that a tied parameter appears under each of its names, as the filter looks
    each one up. Under ZeRO-3, call it inside a gather of the trainable parameters."""
    return {name: t.detach().to("cpu", copy=True)
            for name, t in peft_model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.nn.Parameter) and t.requires_grad}


def adapter_state_dict(wrapper: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The adapter's tensors of the trained module (`CausalLMWithLoss`), whole, on the main process; None
    elsewhere. A collective under ZeRO-3 (every rank calls it): the trainable parameters are gathered."""
    with gathered_parameters([p for p in wrapper.parameters() if p.requires_grad]):
        if not is_main:
            return None
        return trainable_state_dict(wrapper.peft_model)  # unfiltered: save_adapter filters once


@contextlib.contextmanager
def _base_path_in_config(peft_model, base_path: str | None):
    """Point the saved adapter_config.json at `base_path` (only while saving)."""
    if base_path is None:
        yield
        return
    cfg = peft_model.peft_config[peft_model.active_adapter]
    saved = cfg.base_model_name_or_path
    cfg.base_model_name_or_path = base_path
    try:
        yield
    finally:
        cfg.base_model_name_or_path = saved


def save_adapter(peft_model, state: dict[str, torch.Tensor], directory: str | Path, *,
                 base_model_path: str | None = None) -> None:
    """PEFT's adapter files from `trainable_state_dict`'s output. `save_embedding_layers=False`: peft's
    "auto" would add the whole embedding table when an embedding layer is targeted (and ask the Hub whether
    the vocabulary changed); a distsft adapter stays adapter-sized, and an embedding trained in full is
    in it anyway, as a `modules_to_save` copy."""
    with _base_path_in_config(peft_model, base_model_path):
        peft_model.save_pretrained(str(directory), state_dict=state, save_embedding_layers=False)


def export_base(model_cfg, *, seed: int, device: torch.device, directory: Path, tokenizer) -> Path | None:
    """Rebuild a random-init base exactly as training built it and save it as a plain HF model; None
    (nothing written) for a pretrained base, a 4-bit one, a base that ZeRO-3 built partitioned (its values
    depend on the partitioning), or one too large to keep."""
    from distsft.model import _without_zero_init, _zero3, load_base_model

    if model_cfg.name_or_path is not None or model_cfg.load_in_4bit:
        return None
    if _zero3() and model_cfg.zero_init:
        logger.info("the random-init base was built partitioned (ZeRO-3, model.zero_init): not written to %s",
                    directory)
        return None
    # The weights depend on (config, dtype, seed) only: attention and recomputation settings are dropped, so
    # the saved config loads anywhere (`distsft_varlen` is registered only inside a distsft process).
    plain = dataclasses.replace(model_cfg, attn_implementation="sdpa", gradient_checkpointing=False,
                                offload_checkpoints=False)
    with _without_zero_init():
        base = load_base_model(plain, device, seed=seed)
    n = sum(p.numel() for p in base.parameters())
    if n > MAX_EXPORTED_RANDOM_BASE_PARAMS:
        logger.info("random-init base of %s parameters: not written (the adapter names its config only)", f"{n:,}")
        return None
    base.config.use_cache = True  # training turned it off; whoever loads this base generates with it
    base.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def model_card(cfg, *, base_model: str, steps: int, train_loss: float | None, eval_loss: float | None,
               world_size: int) -> str:
    """A README.md for the adapter: what was trained on what, with which settings, and how to load it."""
    from distsft import __version__

    sources = [s.path for s in cfg.data.sources]
    hub_sources = [s for s in sources if not s.startswith(("builtin:", "memory:", "/", ".", "~"))
                   and not Path(s).exists()]
    demo = cfg.model.name_or_path is None
    tags = ["distsft", "lora", "sft"] + (["qlora"] if cfg.model.load_in_4bit else [])
    front = ["---", "library_name: peft", f"base_model: {json.dumps(base_model)}",
             "pipeline_tag: text-generation", f"tags: [{', '.join(tags)}]"]
    if hub_sources:
        front.append("datasets: [" + ", ".join(json.dumps(s) for s in hub_sources) + "]")
    front.append("---")
    lora = cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    rows = [
        ("base model", base_model + (" (random init from " + cfg.model.init_from_config + f", seed {cfg.train.seed})"
                                     if demo else "")),
        ("data", ", ".join(sources)),
        ("LoRA", f"r {lora.r}, alpha {lora.alpha:g}{' (rsLoRA)' if lora.use_rslora else ''}, dropout {lora.dropout:g}, "
                 f"targets {targets}" + (f", trained in full: {', '.join(lora.modules_to_save)}"
                                         if lora.modules_to_save else "")),
        ("quantized base", "4-bit " + cfg.model.bnb_4bit_quant_type if cfg.model.load_in_4bit else "no"),
        ("max sequence length", f"{cfg.data.max_seq_len} tokens" + (", packed" if cfg.data.packing else "")),
        ("optimizer steps", f"{steps} (global batch {cfg.train.per_device_train_batch_size} x "
                            f"{cfg.train.gradient_accumulation_steps} accumulation x {world_size} processes)"),
        ("learning rate", f"{cfg.train.learning_rate:g}, {cfg.train.lr_scheduler_type}"),
        ("train loss (mean of the last logging window)", "n/a" if train_loss is None else f"{train_loss:.4f}"),
    ]
    if eval_loss is not None:
        rows.append(("eval loss", f"{eval_loss:.4f}"))
    rows.append(("trained with", f"distsft {__version__}, "
                                 f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}"))
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    return "\n".join([
        *front, "",
        f"# LoRA adapter for {cfg.model.name_or_path or cfg.model.init_from_config + ' (random init)'}", "",
        table, "",
        "## Use", "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        "```", "",
        "or `distsft generate <this directory> --prompt \"...\"`; `distsft merge <this directory> <out>` writes "
        "a plain model with the adapter merged in. `distsft_config.yaml` is the run's full configuration.", "",
    ])


def export_adapter(peft_model, state: dict[str, torch.Tensor], directory: Path, *, cfg, tokenizer,
                   device: torch.device, steps: int, train_loss: float | None, eval_loss: float | None,
                   world_size: int) -> None:
    """The final adapter (main process): PEFT files, tokenizer, model card, resolved config; for a
    random-init base also `<output_dir>/base/`, which the adapter then names as its base."""
    from distsft.data.templates import resolve_template

    # The template the data was rendered with (a built-in one when the tokenizer has none): generating
    # through the saved tokenizer's chat template then prompts the model the way it was trained.
    tokenizer.chat_template = resolve_template(cfg.data.chat_template, tokenizer)[1]
    base_dir = export_base(cfg.model, seed=cfg.train.seed, device=device, directory=directory.parent / "base",
                           tokenizer=tokenizer)
    base = str(base_dir.resolve()) if base_dir is not None else None
    save_adapter(peft_model, state, directory, base_model_path=base)
    tokenizer.save_pretrained(directory)
    cfg.save(directory / CONFIG_FILE)
    base_name = base or cfg.model.name_or_path or str(cfg.model.init_from_config)
    (directory / "README.md").write_text(model_card(cfg, base_model=base_name, steps=steps, train_loss=train_loss,
                                                    eval_loss=eval_loss, world_size=world_size))


def merged_model(peft_model) -> nn.Module:
    """The base model with the adapter merged in, as a plain HF model. On a 4-bit base every linear layer
    is dequantized to its compute dtype and the LoRA update added there (merging into NF4, as peft does,
    would re-quantize the sum and lose most of the adapter's small update)."""
    base = peft_model.get_base_model()
    if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base.config, "quantization_config", None)):
        return peft_model.merge_and_unload()
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    def dequantized(layer) -> torch.Tensor:
        if isinstance(layer, bnb.nn.Linear4bit):
            data, state = layer.weight.data, layer.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                # bitsandbytes repacks a CPU weight in place at its first eval forward (for its bf16
                # kernel), and dequantize_4bit reads that layout as garbage: unpack it first.
                data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            w = bnb.functional.dequantize_4bit(data, state)
            return w.to(layer.compute_dtype or w.dtype)
        return layer.weight.data

    def plain(weight: torch.Tensor, bias) -> nn.Linear:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                        device=weight.device)
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias.to(weight.dtype))
        return out

    # Parents first in named_modules order, so a replaced LoRA layer's own children are never visited.
    for _, parent in list(base.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                layer = child.get_base_layer()
                w = dequantized(layer)
                for adapter in child.active_adapters:
                    w = w + child.get_delta_weight(adapter).to(w.dtype)
                setattr(parent, name, plain(w, layer.bias))
            elif isinstance(child, ModulesToSaveWrapper):
                setattr(parent, name, child.modules_to_save[child.active_adapter])
            elif isinstance(child, bnb.nn.Linear4bit):
                setattr(parent, name, plain(dequantized(child), child.bias))
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(base, attr):
            setattr(base, attr, False)
    if hasattr(base, "hf_quantizer"):
        base.hf_quantizer = None
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    return base


def export_merged(peft_model, tokenizer, directory: Path) -> None:
    """`checkpoint.save_merged`: the base with the adapter merged in, and the tokenizer (main process)."""
    merged = merged_model(peft_model)
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.info("merged model written to %s", directory)


# ----------------------------------------------------------------------------------------------------
# Loading an adapter again: `distsft merge`, `distsft generate`


def adapter_base(adapter_dir: Path, base: str | None = None) -> str:
    """The base model an adapter directory belongs to: `base`, else its adapter_config.json's."""
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise ValueError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    if base is not None:
        return base
    name = json.loads(config.read_text()).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{config}: names no base model; pass --base")
    if Path(name).is_dir() and not any(Path(name).glob("*.safetensors")) and not any(Path(name).glob("*.bin")):
        raise ValueError(f"{config}: its base {name} holds a config but no weights (a random-init base that was "
                         "not exported); pass --base")
    return name


def load_adapted(adapter_dir: str | Path, *, base: str | None = None, dtype: str = "auto",
                 device: str | torch.device = "cpu", load_in_4bit: bool | None = None):
    """(peft model, tokenizer) from an adapter directory. The base is loaded the way the run trained it
    where `distsft_config.yaml` says so (4-bit), unless `load_in_4bit` says otherwise."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.config import load_config
    from distsft.dtypes import resolve_dtype

    adapter_dir = Path(adapter_dir)
    base_name = adapter_base(adapter_dir, base)
    run_cfg = load_config(adapter_dir / CONFIG_FILE) if (adapter_dir / CONFIG_FILE).is_file() else None
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype if dtype != "auto" or run_cfg is None else run_cfg.model.dtype, device)
    four_bit = load_in_4bit if load_in_4bit is not None else bool(run_cfg and run_cfg.model.load_in_4bit)
    kwargs = {}
    if four_bit:
        from transformers import BitsAndBytesConfig

        m = run_cfg.model if run_cfg is not None else None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=m.bnb_4bit_quant_type if m else "nf4",
            bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant if m else True, bnb_4bit_compute_dtype=torch_dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch_dtype, **kwargs)
    if not four_bit:
        model.to(device)
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base_name)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval(), tokenizer


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None, dtype: str = "auto",
                  device: str = "cpu") -> Path:
    """adapter + base -> a plain HF model with the update merged in, plus the tokenizer. Works for any
    distsft adapter, whatever the run's mode (a ZeRO-3 run's adapter is gathered whole at export). A QLoRA
    adapter is merged into the dequantized 4-bit base it trained against (`merged_model`)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose another output directory")
    peft_model, tokenizer = load_adapted(adapter_dir, base=base, dtype=dtype, device=device)
    merged = merged_model(peft_model)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
