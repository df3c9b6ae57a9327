"""4-bit bases (QLoRA), in one room: bitsandbytes' loading arguments, the random 4-bit build on the meta
device, the guard against bitsandbytes' CPU repacking, and the per-layer dequantizer the fused LoRA
projections call.

    kwargs = quantization_kwargs(cfg.model, hf_config, dtype, device, zero3=...)  # from_pretrained(**kwargs)
    model = build_random_4bit(hf_config, kwargs["quantization_config"], ...)     # a random init, 4-bit
    keep_4bit_training_layout(model)                                              # after either
    w = Dequantized4bit(layer, spec)     # what distsft.fused_lora hands kernels.lora_projections as W

The LoRA update trains in full precision on top; the fused projections (distsft/fused_lora.py) dequantize
each 4-bit weight inside their forward and again in their backward, never keeping the full-precision
copy, with our one-pass kernel (kernels/distsft_kernels/dequant.py) or bitsandbytes' (`kernels.dequantize_4bit=false`).
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from typing import TYPE_CHECKING

import distsft_kernels as K
import torch
from torch import nn

from distsft import census

if TYPE_CHECKING:
    from distsft.config import ModelConfig

logger = logging.getLogger(__name__)


def is_4bit(base) -> bool:
    """A bitsandbytes Linear4bit whose weight is quantized (its quant_state is set). The weight is read from
    the parameter dict itself: this runs for every projection in every forward and recompute, and under
    ZeRO-3 `base.weight` goes through DeepSpeed's gathering getter (`ZeROOrderedDict.__getitem__`, ~13 us
    per call on the CI host), which a type check does not need."""
    return type(base).__name__ == "Linear4bit" and hasattr(dict.get(base._parameters, "weight"), "quant_state")


def quantization_kwargs(cfg: ModelConfig, hf_config, dtype: torch.dtype, device: torch.device, *, zero3: bool
                        ) -> dict:
    """`from_pretrained` / random-init arguments for bitsandbytes 4-bit (`model.load_in_4bit`, or a
    checkpoint that is already quantized: `hf_config`, the model's config, carries a quantization_config);
    {} otherwise. `zero3`: a DeepSpeed ZeRO-3 config is active. Weights are quantized layer by layer as
    they load (or, for a random init, as they are drawn), so the full-precision model never exists on the
    device.

    Under ZeRO-3 every rank builds the whole 4-bit model (small: ~0.53 byte per weight) and
    `accelerate.prepare` partitions it like any other parameter: the packed bytes are stored in the model
    dtype (`bnb_4bit_quant_storage` auto), so a 4-bit weight is a tensor of that dtype DeepSpeed can shard
    and gather with the rest of the model, and its quant_state (absmax, code) stays on the parameter object,
    whole on every rank. DeepSpeed converts each parameter from rank 0's bytes while each rank keeps its own
    quant_state: ranks must quantize identically, which the same checkpoint or seed gives."""
    from transformers import BitsAndBytesConfig

    source = cfg.name_or_path or cfg.init_from_config
    if getattr(hf_config, "quantization_config", None) is not None:
        if cfg.name_or_path is None:
            raise ValueError(f"model.init_from_config: {source} carries a quantization_config, but a random init "
                             "is quantized with the model.bnb_4bit_* settings: remove it from the config")
        if zero3:
            raise ValueError(
                f"model.name_or_path: {source} is already quantized, which is not supported under ZeRO-3: its "
                "4-bit storage dtype is fixed by the checkpoint (usually uint8) where ZeRO-3 here shards 4-bit "
                "weights stored in the model dtype. Load the full-precision checkpoint with "
                "model.load_in_4bit=true (quantized while loading), or train this one under ZeRO-2 or DDP")
        logger.info("%s is already quantized: loading it with its own quantization settings", cfg.name_or_path)
        return {"device_map": {"": device}}
    if not cfg.load_in_4bit:
        return {}
    compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else getattr(torch, cfg.bnb_4bit_compute_dtype)
    if cfg.bnb_4bit_quant_storage == "auto":
        storage = dtype if zero3 else torch.uint8
    else:
        storage = getattr(torch, cfg.bnb_4bit_quant_storage)
    if zero3 and storage != dtype:
        raise ValueError(
            f"model.bnb_4bit_quant_storage: under ZeRO-3 the packed 4-bit weights are stored in the model dtype "
            f"({dtype}) so that every partitioned parameter has one dtype; got {cfg.bnb_4bit_quant_storage} "
            "(leave it auto)")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )
    return {"quantization_config": quant, "device_map": {"": device}}  # each rank its copy on its device


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes' CPU backend from repacking 4-bit weights for inference.

    On a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode without grad (our packing self-check, any
    eval) rewrites `weight.data` in place into a layout for its inference kernel and marks the quant_state
    (`packing_format_for_cpu`); every later forward, in training too, then goes through `gemv_4bit`, which
    has no autograd formula: no gradient flows back through the 4-bit layer's input, silently (only LoRA
    layers downstream of the last 4-bit matmul still learn). Under ZeRO-3 the repacked data also replaces a
    gathered parameter, so the next gather pairs the original bytes with the repacked quant_state (garbage
    logits). Training wants the autograd path on every forward; GPUs never take this branch."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_random_4bit(hf_config, quant, *, dtype: torch.dtype, device: torch.device, seed: int,
                      attn_implementation: str = "sdpa", trust_remote_code: bool = False):
    """A randomly initialised causal LM whose linear layers are bitsandbytes 4-bit, built without the
    full-precision model ever existing: a Llama-3.1-70B shape (140 GB in bf16) fits one 80 GB GPU.

    1. The skeleton is built on the meta device (shapes only, no storage).
    2. transformers' own bitsandbytes quantizer swaps the target `nn.Linear`s for `Linear4bit` on that
       skeleton, exactly as `from_pretrained(quantization_config=...)` does (same modules left in full
       precision: the LM head and anything in `llm_int8_skip_modules`).
    3. One unit at a time (a decoder layer whole, or a module holding tensors of its own outside the
       layer lists: embeddings, final norm, LM head, rotary buffers), its tensors are materialised on
       `device` in `dtype`, drawn by the model's own `_init_weights`, and its `Linear4bit` weights quantized
       there; the full-precision copy is freed before the next unit. Peak extra memory: one decoder
       layer's weights in `dtype` (1.7 GB for the 70B shape) plus bitsandbytes' temporaries.
    4. The quantizer's post-processing marks the model as from_pretrained does (`is_loaded_in_4bit`,
       `hf_quantizer`, `config.quantization_config`), so peft's `get_peft_model` treats it the same.

    Each unit draws from its own generator state, seeded from (`seed`, the unit's name) only: every rank
    builds the same weights whatever it drew before (DDP ranks agree), and a unit's values do not depend on
    the other units. The values differ from `from_config`'s (one RNG stream over the whole model) and
    between CPU and CUDA (different generators).

    Call it outside deepspeed.zero.Init (distsft.model.load_base_model does: a 4-bit model is never
    built partitioned); under it transformers would build the meta skeleton partitioned.
    """
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:  # transformers < 5: torch.nn.init is not patched, and needs not be
        guard_torch_init_functions = contextlib.nullcontext

    device_map = {"": device}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
    quantizer.validate_environment(device_map=device_map)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map, checkpoint_files=None,
                               use_kernels=False)

    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (it, its replacement): ties
    with torch.no_grad(), guard_torch_init_functions():
        for name, unit, owner, whole in _init_units(model):
            _draw_unit(list(unit.modules()) if whole else [unit], owner, made, dtype=dtype, device=device,
                       seed=zlib.crc32(f"{seed}:{name}".encode()))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"tensors not materialised: {left[:5]}"
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def _draw_unit(modules: list[nn.Module], owner, made: dict, *, dtype: torch.dtype, device: torch.device,
               seed: int) -> None:
    """Materialise `modules`' meta tensors on `device`, draw them with `owner._init_weights` from `seed`,
    then quantize their `Params4bit` weights. A function of its own so that no local outlives the unit:
    on return the only full-precision tensors left are those the model keeps (embeddings, norms, head)."""
    import bitsandbytes as bnb

    pending = []  # (module, key, meta Params4bit): quantized once the unit is drawn
    for module in modules:
        for key, t in list(module._parameters.items()):
            if t is None or not t.is_meta:
                continue
            if id(t) in made:  # a tied weight: the one tensor, materialised once
                module._parameters[key] = made[id(t)][1]
                continue
            quantized = isinstance(t, bnb.nn.Params4bit)  # drawn in the model dtype, as a checkpoint loads
            module._parameters[key] = nn.Parameter(
                torch.empty(t.shape, dtype=dtype if quantized else t.dtype, device=device),
                requires_grad=False if quantized else t.requires_grad)
            if quantized:
                pending.append((module, key, t))
            else:
                made[id(t)] = (t, module._parameters[key])
        for key, t in list(module._buffers.items()):
            if t is not None and t.is_meta:
                module._buffers[key] = torch.empty_like(t, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in reversed(modules):  # children before parents, as `initialize_weights` does
            owner._init_weights(module)
    for module, key, meta in pending:
        attrs = {k: v for k, v in vars(meta).items() if k not in ("quant_state", "bnb_quantized")}
        # Params4bit.to(device) quantizes (on CPU too) and `module=` hands the quant_state to the layer;
        # replacing the parameter frees the full-precision weight.
        module._parameters[key] = bnb.nn.Params4bit(module._parameters[key].data, requires_grad=False,
                                                    **attrs).to(device)
        module._parameters[key]._is_hf_initialized = True
        made[id(meta)] = (meta, module._parameters[key])


def _init_units(model: nn.Module):
    """(name, module, owning PreTrainedModel, whole) in the order they are drawn: every element of an
    `nn.ModuleList` (a decoder layer) whole, and every other module for the tensors it holds itself,
    children before parents. The owner's `_init_weights` draws the unit (a model nested in another
    keeps its own init)."""
    from transformers import PreTrainedModel

    def walk(module: nn.Module, prefix: str, owner):
        if isinstance(module, PreTrainedModel):
            owner = module
        for key, child in module.named_children():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(module, nn.ModuleList):
                yield name, child, owner, True
            else:
                yield from walk(child, name, owner)
        if not isinstance(module, nn.ModuleList) and (
                any(t is not None for t in module._parameters.values())
                or any(t is not None for t in module._buffers.values())):
            yield prefix, module, owner, False

    yield from walk(model, "", model)


def dequantize_4bit(layer, spec, out: torch.Tensor | None = None, tail: tuple | None = None) -> torch.Tensor:
    """A bitsandbytes Linear4bit weight as a (out, in) tensor in its compute dtype (written into `out`, a
    possibly row-strided (out, in) view, when given; with `tail = (b, col, width)` also the `width` columns
    after `out` in its rows: zeros but `b` from column `col`, as `K.Dequantizer` takes it). `spec`: the
    LoRA layer's patching spec (`.dequantize_4bit`, `.backend`, `.name`)."""
    w = dict.__getitem__(layer._parameters, "weight")  # whole here (`fused_lora.unfused_reason`): no ZeRO-3 getter
    state = w.quant_state
    dtype = layer.compute_dtype if layer.compute_dtype is not None else state.dtype
    plan = layer.__dict__.get("_distsft_dequantizer")  # (what it was built from, K.Dequantizer)
    if plan is not None and spec.dequantize_4bit and spec.backend != "torch" and plan[0] == _quant_sources(
            w, state, dtype):
        census.note("dequantize_4bit", "triton", spec.name)
        # a ZeRO-3 parameter's bytes are in a new buffer after each gather: passed per call
        return plan[1](out, tail, data=w.data if _moves(w) else None)
    full = _dequantize_4bit_uncached(layer, spec, w, state, dtype, out)
    if tail is not None:  # (later calls write these in the dequantization's launch, where it is ours)
        b, col, width = tail
        cols = out.as_strided((out.shape[0], width), out.stride(), out.storage_offset() + out.shape[1])
        cols.zero_()
        cols[:, col:col + b.shape[1]].copy_(b)
    return full


def _dequantize_4bit_uncached(layer, spec, w, state, dtype, out: torch.Tensor | None) -> torch.Tensor:
    data = w.data
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU layout (keep_4bit_training_layout)
        import bitsandbytes as bnb

        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        full = bnb.functional.dequantize_4bit(data, state)
    elif spec.dequantize_4bit and census.use_triton(spec.backend, data):
        census.note("dequantize_4bit", "triton", spec.name)
        if state.dtype == dtype:
            # checked once, then each call is little more than the launch (~640 per 8B step)
            moves = _moves(w)
            plan = (_quant_sources(w, state, dtype), K.Dequantizer.from_state(data, state, hold_data=not moves))
            layer.__dict__["_distsft_dequantizer"] = plan
            return plan[1](out, data=data if moves else None)
        full = K.dequantize_4bit_state(data, state)
    else:
        import bitsandbytes as bnb

        census.note("dequantize_4bit", "bitsandbytes", spec.name)
        full = bnb.functional.dequantize_4bit(data, state)
    if out is not None:
        return out.copy_(full)
    return full if full.dtype == dtype else full.to(dtype)


def _moves(w) -> bool:
    """A ZeRO-3 parameter: its bytes are in a new buffer after every gather (and freed after its release)."""
    return hasattr(w, "ds_id")


def _quant_sources(w, state, dtype) -> tuple:
    """What a layer's cached Dequantizer was built from, compared by identity (and the packed storage's
    address, except for a ZeRO-3 parameter, whose bytes are passed per call): moving or replacing the
    weight or its quantization state (`.to(device)`, a reload) changes one of them, and the next call
    builds a new one."""
    s2 = state.state2 if state.nested else None
    return (0 if _moves(w) else w.data_ptr(), id(state), id(state.absmax), id(state.code), id(state.offset),
            id(s2.absmax) if s2 is not None else 0, id(s2.code) if s2 is not None else 0, dtype)


class Dequantized4bit:
    """A 4-bit base weight as lora_projections takes a weight callable: `fn(out=None, tail=None)`."""

    writes_tail = True  # fills [W | B_pad]'s B columns itself (in the dequantization's launch)
    __slots__ = ("layer", "spec")

    def __init__(self, layer, spec):
        self.layer, self.spec = layer, spec

    def __call__(self, out: torch.Tensor | None = None, tail: tuple | None = None) -> torch.Tensor:
        return dequantize_4bit(self.layer, self.spec, out, tail)


KEEP_RECOMPUTED_DEQUANT = False
"""4-bit bases in a checkpointed layer's recompute: keep each dequantized weight for the backward that
follows instead of dequantizing it again (~0.3 GB more at the peak for an 8B layer; off by default)."""
