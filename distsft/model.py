"""Model construction: HF causal LM (pretrained or from a config) -> LoRA (peft) -> `CausalLMWithLoss`.

`CausalLMWithLoss` is the module the loop trains and `accelerate.prepare` wraps. It runs the decoder,
then computes the loss from the final hidden states and the LM head weight in its own forward
(DESIGN.md rule 8). Owning the head and the loss here is what lets a fused linear cross-entropy replace
the (tokens, vocab) logits, and under DeepSpeed ZeRO-3 it is what makes the engine gather
`lm_head.weight` before we read it: the forward of the prepared module is where parameters are whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distsft.config import KernelsConfig, LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
IGNORE_INDEX = -100

# (hidden (N, d), weight (V, d), targets (N,), *, bias, softcap) -> (loss_sum fp32, n_valid int64)
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def resolve_path(spec: str) -> str:
    """`builtin:NAME` -> the shipped asset directory; anything else unchanged (path or hub id)."""
    if spec.startswith("builtin:"):
        path = ASSETS / spec.removeprefix("builtin:")
        if not path.exists():
            known = ", ".join(sorted(p.name for p in ASSETS.iterdir()))
            raise ValueError(f"unknown builtin asset {spec!r} (known: {known})")
        return str(path)
    return spec


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path or resolve_path(cfg.init_from_config)
    source = resolve_path(source)
    if Path(source).is_file():  # a config.json path: its directory holds the tokenizer
        source = str(Path(source).parent)
    tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions never carry a target, so reusing EOS as PAD cannot drop EOS from the loss here:
        # targets come from the data pipeline's spans, not from `input_ids != pad`.
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def _without_zero_init():
    """Build the model whole even though a ZeRO-3 config is active (transformers would otherwise
    construct it under deepspeed.zero.Init, partitioned)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def load_base_model(cfg: ModelConfig, device: torch.device, *, seed: int):
    """The HF causal LM in the configured dtype, on CPU (accelerate moves it). Under ZeRO-3 with
    `model.zero_init` it is built already partitioned across ranks."""

    dtype = resolve_dtype(cfg.dtype, device)
    common = dict(trust_remote_code=cfg.trust_remote_code)
    if cfg.load_in_4bit:
        common.update(_quantization_kwargs(cfg, dtype, device))
    with contextlib.nullcontext() if cfg.zero_init else _without_zero_init():
        model = _build(cfg, dtype, common, seed)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no `enable_input_require_grads` hack for frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _quantization_kwargs(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """bitsandbytes 4-bit loading: weights are quantized layer by layer as they load, so the full-precision
    model never exists on the device at once."""
    from transformers import AutoConfig, BitsAndBytesConfig

    if _zero3():
        # Seen on CPU (DeepSpeed 0.19.8, bitsandbytes 0.50): the first forward under ZeRO-3 computes with
        # wrongly gathered 4-bit weights (the packing self-check caught it). Refuse rather than train on
        # wrong numbers; 4-bit weights are small enough to replicate under ZeRO-2 or DDP.
        raise ValueError("model.load_in_4bit is not supported under ZeRO-3 yet: use ZeRO-2 or DDP (the 4-bit "
                         "base is replicated, the adapter's optimizer state is still sharded under ZeRO-2)")
    pretrained = AutoConfig.from_pretrained(resolve_path(cfg.name_or_path), revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    if getattr(pretrained, "quantization_config", None) is not None:
        logger.info("%s is already quantized: loading it with its own quantization settings", cfg.name_or_path)
        return {"device_map": {"": device}}
    compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else getattr(torch, cfg.bnb_4bit_compute_dtype)
    storage = torch.uint8 if cfg.bnb_4bit_quant_storage == "auto" else getattr(torch, cfg.bnb_4bit_quant_storage)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )
    return {"quantization_config": quant, "device_map": {"": device}}  # each rank its copy on its device


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


def _build(cfg: ModelConfig, dtype: torch.dtype, common: dict, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(cfg.name_or_path),
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            **common,
        )
    else:
        hf_config = AutoConfig.from_pretrained(resolve_path(cfg.init_from_config), **common)
        # Random init must not depend on the rank or on anything drawn before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=dtype, attn_implementation=cfg.attn_implementation, **common
            )
    return model


def add_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save or None,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )
    # peft keeps adapter weights in fp32 when the base is bf16/fp16 (autocast_adapter_dtype=True):
    # they are the optimizer's master weights, so no separate fp32 copy is needed.
    return get_peft_model(model, peft_cfg)


def reference_loss(hidden, weight, targets, *, bias=None, softcap=None):
    """HF's numerics: logits in the model dtype, upcast to fp32, summed cross-entropy and its count."""
    logits = nn.functional.linear(hidden, weight, bias).float()  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss_sum = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, targets.ne(IGNORE_INDEX).sum()


class CausalLMWithLoss(nn.Module):
    """peft model + the loss. forward(batch) -> (summed token loss fp32, number of target tokens)."""

    def __init__(self, peft_model: nn.Module, loss_fn: LossFn = reference_loss):
        super().__init__()
        self.peft_model = peft_model
        self.loss_fn = loss_fn
        causal_lm = peft_model.get_base_model()
        self.softcap = getattr(causal_lm.config, "final_logit_softcapping", None)

    @property
    def causal_lm(self) -> nn.Module:
        return self.peft_model.get_base_model()

    @property
    def config(self):
        """The HF model config (accelerate reads hidden_size from it to size DeepSpeed's buckets)."""
        return self.causal_lm.config

    def lm_head(self) -> nn.Linear:
        head = self.causal_lm.get_output_embeddings()
        # `lm_head` in lora.modules_to_save: peft wraps it; the trained copy is the active adapter's.
        if hasattr(head, "modules_to_save"):
            head = head.modules_to_save[self.peft_model.active_adapter]
        return head

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, **attn_kwargs) -> torch.Tensor:
        """`attn_kwargs`: what the attention implementation reads per batch (varlen: `cu_seq_lens_q`, ...)."""
        decoder = self.causal_lm.get_decoder()
        # use_cache=False: with a cache, transformers stops separating packed documents by position_ids.
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **attn_kwargs)
        return out.last_hidden_state  # (B, T, d)

    def forward(self, input_ids, target_ids, position_ids=None, attention_mask=None, **attn_kwargs):
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, **attn_kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, d)
        targets = target_ids.reshape(-1)  # (B*T,)
        # Only positions with a target reach the LM head: masked prompt and padding tokens would cost
        # a (tokens, vocab) matmul for nothing. The sum over the kept rows is unchanged.
        keep = targets.ne(IGNORE_INDEX)
        head = self.lm_head()
        return self.loss_fn(hidden[keep], head.weight, targets[keep], bias=head.bias, softcap=self.softcap)

    @torch.no_grad()
    def logits(self, input_ids, position_ids=None, attention_mask=None, **attn_kwargs) -> torch.Tensor:
        """Full logits for evaluation and tests (materialises (B, T, V))."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, **attn_kwargs)
        return self.lm_head()(hidden).float()


def build_model(
    model_cfg: ModelConfig, lora_cfg: LoraConfig, kernels_cfg: KernelsConfig, device: torch.device, *, seed: int
) -> tuple[CausalLMWithLoss, dict]:
    """Base model -> LoRA -> kernels patched on this instance -> loss wrapper. Returns (module, kernel report)."""
    from distsft import attention

    if model_cfg.attn_implementation != attention.resolve(model_cfg.attn_implementation, device):
        model_cfg = dataclasses.replace(model_cfg, attn_implementation=attention.resolve("auto", device))
    if model_cfg.attn_implementation == attention.NAME:
        attention.register()
    base = load_base_model(model_cfg, device, seed=seed)
    peft_model = add_lora(base, lora_cfg)
    from distsft.patching import apply_kernels, select_loss_fn

    report = apply_kernels(peft_model, kernels_cfg)
    return CausalLMWithLoss(peft_model, select_loss_fn(kernels_cfg)), report


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
