"""Model construction: HF causal LM (pretrained or from a config) -> LoRA (peft) -> `CausalLMWithLoss`.

`CausalLMWithLoss` is the module the loop trains and `accelerate.prepare` wraps. It runs the decoder,
then computes the loss from the final hidden states and the LM head weight in its own forward
(DESIGN.md rule 8). Owning the head and the loss here is what lets a fused linear cross-entropy replace
the (tokens, vocab) logits, and under DeepSpeed ZeRO-3 it is what makes the engine gather
`lm_head.weight` before we read it: the forward of the prepared module is where parameters are whole.

The rooms it draws on: the loss function and the target positions (distsft/loss.py), 4-bit loading and
the random 4-bit build (distsft/qlora.py), our kernels bound into the instance (distsft/patching.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from distsft.config import KernelsConfig, LoraConfig, ModelConfig
from distsft.dtypes import resolve_dtype
from distsft.loss import LossFn, select_loss_fn, target_indices

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"


def resolve_path(spec: str) -> str:
    """`builtin:NAME` -> the shipped asset directory; anything else unchanged (path or hub id)."""
    if spec.startswith("builtin:"):
        path = ASSETS / spec.removeprefix("builtin:")
        if not path.exists():
            known = ", ".join(sorted(p.name for p in ASSETS.iterdir()))
            raise ValueError(f"unknown builtin asset {spec!r} (known: {known})")
        return str(path)
    return spec


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
    `model.zero_init` it is built already partitioned across ranks. With `model.load_in_4bit` the
    quantized linear layers are built on `device` directly (bitsandbytes quantizes where the weight lies)."""

    from distsft.qlora import keep_4bit_training_layout

    dtype = resolve_dtype(cfg.dtype, device)
    common = dict(trust_remote_code=cfg.trust_remote_code)
    common.update(_quantization_kwargs(cfg, dtype, device))
    # A 4-bit model is never built under deepspeed.zero.Init (transformers refuses its device_map there):
    # every rank builds its whole 4-bit copy, ~0.53 byte per weight, and accelerate.prepare partitions it.
    partitioned = cfg.zero_init and "device_map" not in common
    with contextlib.nullcontext() if partitioned else _without_zero_init():
        model = _build(cfg, dtype, common, seed)
    keep_4bit_training_layout(model)
    _without_hub_kernels(model)
    model.config.use_cache = False  # recomputation is set up on the trained module (distsft/recompute.py)
    return model


def _without_hub_kernels(model: nn.Module) -> None:
    """Turn off transformers' hub kernels on this model: distsft patches its own kernels per instance.

    With the `kernels` package installed (bitsandbytes pulls it in), transformers 5.2x `from_pretrained`
    kernelizes the modules it decorates with `use_kernel_forward_from_hub` (RMSNorm, ...), and does so
    again at every `train()`/`eval()` switch, which removes the forward distsft bound to each instance:
    the loop's `model.train()` silently put transformers' RMSNorm back (found by the kernel census).
    `reset_kernels` restores the plain forwards and stops the re-kernelization."""
    if getattr(model, "use_kernels", False) and hasattr(model, "reset_kernels"):
        model.reset_kernels()


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _quantization_kwargs(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """bitsandbytes' loading arguments for this run (distsft.qlora.quantization_kwargs, from the model's
    own config and whether ZeRO-3 is on); {} for a random init in full precision (no config read)."""
    from transformers import AutoConfig

    from distsft.qlora import quantization_kwargs

    if not cfg.load_in_4bit and cfg.name_or_path is None:
        return {}  # a random init in full precision
    hf_config = AutoConfig.from_pretrained(resolve_path(cfg.name_or_path or cfg.init_from_config),
                                           revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return quantization_kwargs(cfg, hf_config, dtype, device, zero3=_zero3())


def _build(cfg: ModelConfig, dtype: torch.dtype, common: dict, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from distsft.qlora import build_random_4bit

    if cfg.name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_path(cfg.name_or_path),
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            **common,
        )
    elif "quantization_config" in common:
        hf_config = AutoConfig.from_pretrained(resolve_path(cfg.init_from_config),
                                               trust_remote_code=cfg.trust_remote_code)
        model = build_random_4bit(hf_config, common["quantization_config"], dtype=dtype,
                                  device=torch.device(common["device_map"][""]), seed=seed,
                                  attn_implementation=cfg.attn_implementation,
                                  trust_remote_code=cfg.trust_remote_code)
    else:
        hf_config = AutoConfig.from_pretrained(resolve_path(cfg.init_from_config), **common)
        # Random init must not depend on the rank or on anything drawn before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=dtype, attn_implementation=cfg.attn_implementation, **common
            )
    return model


def ties_trained_embedding(model, modules_to_save: list[str]) -> bool:
    """Whether `modules_to_save` names the input embedding or the LM head of a model whose two share one
    weight (`tie_word_embeddings`: Gemma, Qwen2.5-0.5B, Llama-3.2-1B, SmolLM2). peft would then train a
    copy of only the named one and break the tie: the trained head and the frozen embedding (or the other
    way round) would differ, and a merged model saved with `tie_word_embeddings=true` would lose one of
    them on reload. Training the one shared matrix keeps the model as it was pretrained."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if not modules_to_save or inp is None or out is None or inp.weight is not out.weight:
        return False
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is inp or m is out}
    return any(m.rsplit(".", 1)[-1] in names for m in modules_to_save)


def add_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tie = ties_trained_embedding(model, cfg.modules_to_save)
    if tie:
        logger.info("lora.modules_to_save %s: the input embedding and the LM head share one weight; it is "
                    "trained as one matrix (the tie is kept)", cfg.modules_to_save)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        modules_to_save=cfg.modules_to_save or None,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
        ensure_weight_tying=tie,
    )
    # peft keeps adapter weights in fp32 when the base is bf16/fp16 (autocast_adapter_dtype=True):
    # they are the optimizer's master weights, so no separate fp32 copy is needed.
    return get_peft_model(model, peft_cfg)


class CausalLMWithLoss(nn.Module):
    """peft model + the loss. forward(batch) -> (summed token loss fp32, number of target tokens).
    `loss_fn`: the LM head's loss (`distsft.loss.select_loss_fn(cfg.kernels)`)."""

    def __init__(self, peft_model: nn.Module, loss_fn: LossFn):
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

    def forward(self, input_ids, target_ids, position_ids=None, attention_mask=None, target_index=None,
                **attn_kwargs):
        """`target_index`: `target_indices(target_ids)`, computed where the batch is still on the host
        (`distsft.train.to_device` does): without it, selecting the rows with a target waits for the GPU
        to finish the whole forward (a boolean index's size is only known there), and so does its backward."""
        if target_index is not None and target_index.device != target_ids.device:
            raise ValueError(f"target_index is on {target_index.device}, target_ids on {target_ids.device}")
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, **attn_kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, d)
        targets = target_ids.reshape(-1)  # (B*T,)
        # Only positions with a target reach the LM head: masked prompt and padding tokens would cost
        # a (tokens, vocab) matmul for nothing. The sum over the kept rows is unchanged.
        if target_index is None:
            target_index = target_indices(targets)
        head = self.lm_head()
        return self.loss_fn(hidden.index_select(0, target_index), head.weight, targets.index_select(0, target_index),
                            bias=head.bias, softcap=self.softcap)

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
    from distsft.patching import apply_kernels  # loads the kernels: not when a preflight imports this module

    report = apply_kernels(peft_model, kernels_cfg)
    wrapper = CausalLMWithLoss(peft_model, select_loss_fn(kernels_cfg))
    trainable, total = trainable_parameter_count(wrapper)
    logger.info("model: %s trainable of %s parameters (%.3f%%); kernels: %s",
                f"{trainable:,}", f"{total:,}", 100 * trainable / total, report)
    return wrapper, report


def trainable_numel_on_meta(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> int:
    """How many parameters this run will train, counted on a skeleton of the model on the meta device
    (shapes only: no weights read or allocated, a second or two at 70B) with the same LoRA applied.
    Used before the accelerator exists, to decide how ZeRO-1/2 run (distributed.zero12_as_ddp)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_path(model_cfg.name_or_path or model_cfg.init_from_config)
    hf_config = AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                           trust_remote_code=model_cfg.trust_remote_code)
    hf_config.__dict__.pop("quantization_config", None)  # the trained count does not depend on it
    with _without_zero_init(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=model_cfg.trust_remote_code)
        peft_model = add_lora(skeleton, lora_cfg)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
