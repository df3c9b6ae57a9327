"""Typed run configuration: nested dataclasses, YAML run files, dotted command-line overrides.

    accelerate launch distsft/train.py --config launch/configs/demo.yaml train.learning_rate=1e-4

Every setting lives in exactly one section below, with its default and a docstring. Where a setting
means what a field of HF `TrainingArguments` / TRL `SFTConfig` means, it carries that field's name.
Unknown keys and invalid values raise `ConfigError`, whose message starts with the dotted key; the
command line turns it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distsft.redaction import redact_config


class ConfigError(ValueError):
    """A bad key or value in the run configuration. `key` is the dotted path, e.g. `train.learning_rate`."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# ----------------------------------------------------------------------------------------------------
# Sections


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str | None = None
    """Hub id or local directory of a pretrained causal LM (`from_pretrained`). Mutually exclusive with
    `init_from_config`."""
    init_from_config: str | None = "builtin:tiny-llama"
    """A model config (a `config.json` or a directory holding one) to build with random weights; tiny
    models for tests and the demo. `builtin:NAME` names one under `distsft/assets/`."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory; defaults to `name_or_path`, else the `init_from_config` directory."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `name_or_path`."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights and compute dtype: `auto` is bfloat16 on a GPU that supports it, else float32."""
    attn_implementation: str = "auto"
    """`auto`: `distsft_varlen` on a GPU (packed documents through varlen flash attention, no mask;
    distsft/attention.py), `sdpa` elsewhere; or any HF implementation: `sdpa` (packed documents through a
    block-diagonal mask), `eager`, `flex_attention`, ... ."""
    trust_remote_code: bool = False
    """Run model code from the hub. Off unless asked: it executes someone else's Python."""
    load_in_4bit: bool = False
    """QLoRA: quantize the frozen base linear layers to 4 bits with bitsandbytes while loading, layer by
    layer; with `init_from_config` each layer is drawn at random and quantized in turn, so a model whose
    full-precision copy would not fit is never built whole. LoRA adapters stay in full precision."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit per parameter saved)."""
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the 4-bit weights are dequantized to for each matmul; `auto` is `model.dtype`."""
    bnb_4bit_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """Storage dtype of the packed 4-bit weights: `auto` is uint8, and under ZeRO-3 the model dtype (the
    only value allowed there: the 4-bit weights are then partitioned with the other parameters)."""
    zero_init: bool = True
    """Under ZeRO-3, build the model already partitioned (deepspeed.zero.Init), as models that do not fit
    one device need. With a random init (`init_from_config`) the values then differ from a whole-model
    build; set false for bitwise-comparable tiny models."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Recompute decoder layers' activations in the backward pass (less memory, ~1/3 slower per layer):
    true: every layer; `auto`: the fewest layers that fit `memory_budget_gib` (distsft/recompute.py;
    on CPU without a budget: none)."""
    memory_budget_gib: float | None = None
    """Memory per device that `gradient_checkpointing: auto` plans for; default 90% of the GPU's memory."""
    offload_checkpoints: bool = False
    """With gradient checkpointing: keep each checkpointed layer's input in pinned host memory instead of
    on the GPU (copied on a side stream, brought back one layer ahead of its backward; distsft/recompute.py).
    The memory-lean setting and long context (Llama-3.1-8B at 131,072 tokens on one 80 GB GPU); one
    process only for now."""

    def __post_init__(self):
        _require(isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto",
                 "gradient_checkpointing", f"expected true, false or auto, got {self.gradient_checkpointing!r}")
        _require(self.memory_budget_gib is None or self.memory_budget_gib > 0, "memory_budget_gib",
                 f"must be > 0 (GiB per device), got {self.memory_budget_gib}")
        _require(not self.offload_checkpoints or self.gradient_checkpointing is not False, "offload_checkpoints",
                 "offloads the inputs of checkpointed layers: set model.gradient_checkpointing to true or auto")
        if self.name_or_path is not None and self.init_from_config == "builtin:tiny-llama":
            self.init_from_config = None  # naming a pretrained model replaces the demo default
        _require(
            (self.name_or_path is None) != (self.init_from_config is None),
            "name_or_path",
            "set exactly one of model.name_or_path (pretrained) and model.init_from_config (random init)",
        )


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Above 0 the fused LoRA kernel cannot run: peft's slower forward is used."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer but the LM head)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. `embed_tokens`, `lm_head`). On a model with
    tied embeddings either name trains the one shared matrix (the tie is kept)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all, or those of the adapted layers."""

    def __post_init__(self):
        _require(self.r > 0, "r", f"must be > 0, got {self.r}")
        _require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list):
            _require(len(self.target_modules) > 0, "target_modules", "must not be empty")


@dataclass(kw_only=True)
class DataSourceConfig:
    path: str
    """A local json/jsonl/parquet/csv/arrow file or folder, a hub dataset id, or `builtin:NAME`. From
    Python a `datasets.Dataset` is accepted in its place: `path` becomes the string `memory:<fingerprint>`,
    so the config stays serialisable, and the dataset itself is kept beside it (`dataset`)."""
    split: str = "train"
    """Hub split, or the split of a `DatasetDict` saved with `save_to_disk`; ignored for plain files."""
    subset: str | None = None
    """Hub dataset configuration name."""
    revision: str | None = None
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = "auto"
    """`auto` detects it from the columns: `messages`/`conversations` -> messages (OpenAI or ShareGPT),
    `instruction`+`output` -> alpaca, `prompt`+`completion` -> prompt_completion, `text` -> text."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Rename this source's columns to the format's names, e.g. `{question: instruction}`."""
    weight: float = 1.0
    """Relative share of this source when several are mixed: source i contributes
    `round(N * weight_i / sum(weights))` training documents per epoch (N = all sources' documents),
    sampled without replacement, repeating whole passes when upsampled."""

    dataset = None  # not a setting (no annotation): the `datasets.Dataset` given as `path`, read by distsft.data

    def __post_init__(self):
        if not isinstance(self.path, str) and hasattr(self.path, "column_names"):
            self.dataset, self.path = self.path, memory_handle(self.path)
        _require(isinstance(self.path, str) and bool(self.path), "path", "must be a non-empty string")
        _require(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


def memory_handle(dataset: Any) -> str:
    """The `memory:` string that stands for an in-memory `datasets.Dataset` in `DataSourceConfig.path`."""
    return f"memory:{getattr(dataset, '_fingerprint', None) or f'id{id(dataset):x}'}"


# distsft.data.templates.TEMPLATE_NAMES plus auto/tokenizer (spelled out: config must not import data)
_CHAT_TEMPLATE_NAMES = ("auto", "tokenizer", "llama-3", "chatml", "mistral", "alpaca",
                        "qwen2.5", "qwen3", "llama-3.1", "gemma-3", "mistral-v0.3")


@dataclass(kw_only=True)
class DataConfig:
    sources: list[DataSourceConfig] = field(
        default_factory=lambda: [DataSourceConfig(path="builtin:gsm8k-demo")]
    )
    """Training datasets; several are mixed by `weight`."""
    eval_path: str | None = None
    """A separate eval file (read with the first source's `format` and `field_map`); else `eval_fraction`
    of each source's valid rows is held out."""
    eval_fraction: float = 0.0
    """Hold out this share of each source's valid rows for evaluation (seeded)."""
    chat_template: str = "auto"
    """`auto` (the tokenizer's own, else chatml), `tokenizer`, `llama-3`, `chatml`, `mistral` or `alpaca`;
    the real templates `qwen2.5`, `qwen3`, `llama-3.1`, `gemma-3`, `mistral-v0.3` (shipped with distsft);
    or a path to a `.jinja` file, or a Jinja template string."""
    train_on_inputs: bool = False
    """Put prompt tokens in the loss too (default: assistant turns only)."""
    max_seq_len: int = 512
    """Tokens per packed slot (and the longest row kept, see `length_policy`)."""
    length_policy: Literal["drop", "truncate_prompt", "raise"] = "drop"
    """Rows longer than `max_seq_len`: drop them, cut the prompt, or stop with an error. `truncate_prompt`
    cuts a raw prompt from the left; in a conversation it drops whole earlier exchanges (keeping the system
    prompt), then cuts the last user message from the left. A reply is never cut."""
    packing: bool = True
    """Pack several documents into each `max_seq_len` slot; attention never crosses a document."""
    shuffle: bool = True
    """Visit the training samples in a fresh permutation each epoch (from the seed and the epoch);
    off: in packing-plan order."""
    strict: bool = False
    """Stop at the first bad row instead of reporting and skipping it."""
    max_drop_ratio: float = 0.5
    """Fail when more than this share of a source's rows is rejected or dropped."""
    log_rejections: int = 5
    """Log this many rejected rows per source in full; `data_report.json` lists them all."""
    cache_dir: str | None = None
    """Where tokenized datasets are cached; default `~/.cache/distsft/data`. `none` disables the cache."""
    num_proc: int = 1
    """Worker processes for tokenization (the main process only); used when each worker gets at least
    2,000 rows, since starting one costs seconds."""
    progress_bar: bool = True
    """Show a progress bar while tokenizing (main process only)."""

    def __post_init__(self):
        _require(len(self.sources) > 0, "sources", "needs at least one dataset")
        _require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        _require(
            not (self.eval_path and self.eval_fraction > 0),
            "eval_fraction",
            "set either data.eval_path (a separate eval file) or data.eval_fraction, not both",
        )
        _require(self.max_seq_len >= 8, "max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        _require(0.0 <= self.max_drop_ratio <= 1.0, "max_drop_ratio", "must be in [0, 1]")
        _require(self.num_proc >= 1, "num_proc", "must be >= 1")
        _require(self.log_rejections >= 0, "log_rejections", "must be >= 0")
        t = self.chat_template
        _require(
            t in _CHAT_TEMPLATE_NAMES or t.endswith(".jinja") or "{{" in t or "{%" in t,
            "chat_template",
            f"unknown template {t!r}: use one of {', '.join(_CHAT_TEMPLATE_NAMES)}, a .jinja file or a "
            "Jinja template string",
        )


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str | None = None
    """Checkpoints, the final adapter, logs and the resolved config go here. Default: `outputs/demo` for the
    embedded demo, else `outputs/<model name>`; when that holds an earlier run, the next free `<dir>-2`,
    `<dir>-3`, ... (an output directory that is set explicitly and holds a run is refused instead)."""
    overwrite_output_dir: bool = False
    """Replace the run that `output_dir` already holds (its checkpoints, adapter, logs). Without it a run
    there is never overwritten: continue it with `checkpoint.resume_from_checkpoint=auto`."""
    per_device_train_batch_size: int = 4
    """Samples (packed slots of `data.max_seq_len` tokens) per micro-batch and process."""
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. The global batch, per_device_train_batch_size x this x processes,
    fixes which samples form each step: keep it when resuming on another number of processes."""
    learning_rate: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trainable parameters."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit"] = "adamw_torch"
    """`adamw_torch` uses the fused implementation on a GPU and the foreach one on the CPU;
    `adamw_torch_fused` the fused one on either; `adamw_8bit` is bitsandbytes (GPU)."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after the warmup (to 0 at the last step, except the constant ones)."""
    warmup_ratio: float = 0.0
    """Share of the optimizer steps that ramp the learning rate up linearly from 0."""
    warmup_steps: int = 0
    """Overrides `warmup_ratio` when > 0."""
    max_steps: int = -1
    """Optimizer steps to run; -1 runs `num_train_epochs` epochs."""
    num_train_epochs: float = 5.0
    """Epochs when `max_steps` is -1."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0: only at the end, when there is an eval set)."""
    seed: int = 42
    """Seeds the random init, dropout (reseeded from seed, step and rank at every step), the data order and
    the eval split."""

    def __post_init__(self):
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be -1 (use epochs) or > 0")
        _require(self.max_steps > 0 or self.num_train_epochs > 0, "num_train_epochs", "must be > 0")
        _require(self.eval_steps >= 0, "eval_steps", f"must be >= 0, got {self.eval_steps}")


@dataclass(kw_only=True)
class CheckpointConfig:
    save_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps, and at the last one (0: only the final adapter)."""
    save_total_limit: int = 2
    """Keep the newest N committed checkpoints."""
    resume_from_checkpoint: str | None = None
    """A checkpoint directory, or `auto` for the newest verified one under `train.output_dir`."""
    save_merged: bool = False
    """Also write the base model with the adapter merged in (`merge_and_unload`) to `output_dir/merged`."""

    def __post_init__(self):
        _require(self.save_steps >= 0, "save_steps", f"must be >= 0, got {self.save_steps}")
        _require(self.save_total_limit >= 1, "save_total_limit", f"must be >= 1, got {self.save_total_limit}")


@dataclass(kw_only=True)
class LoggingConfig:
    logging_steps: int = 10
    """Log metrics (loss, learning rate, throughput, MFU, memory) every N optimizer steps."""
    report_to: list[str] = field(default_factory=list)
    """Trackers besides the always-written JSONL log: `wandb`, `tensorboard` (or `none`)."""
    run_name: str | None = None
    """W&B run name (display name); default: W&B picks one."""
    wandb_project: str = "distsft"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (user or team); default: the API key's default entity."""
    wandb_group: str | None = None
    """W&B group (e.g. one per sweep)."""
    wandb_tags: list[str] = field(default_factory=list)
    wandb_notes: str | None = None
    """W&B run notes (a description)."""
    wandb_job_type: str = "train"
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode; default: the `WANDB_MODE` environment variable, else `online`. `offline` writes the run
    under `output_dir/wandb/` for a later `wandb sync`, with no network and no API key."""
    progress_bar: bool = True
    """A tqdm bar on the main process; off: one log line per logging window instead."""
    peak_tflops: float | None = None
    """Override the GPU's peak bf16 dense TFLOP/s used for MFU."""

    def __post_init__(self):
        _require(self.logging_steps >= 1, "logging_steps", f"must be >= 1, got {self.logging_steps}")
        self.report_to = list(dict.fromkeys(r for r in self.report_to if r != "none"))
        for r in self.report_to:
            _require(r in ("wandb", "tensorboard"), "report_to", f"unknown tracker {r!r} (wandb, tensorboard)")
        _require(bool(self.wandb_project), "wandb_project", "must not be empty")
        _require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "peak_tflops",
            f"must be > 0 (TFLOP/s per GPU), got {self.peak_tflops}",
        )


@dataclass(kw_only=True)
class KernelsConfig:
    backend: Literal["auto", "triton", "torch"] = "auto"
    """`auto`: Triton kernels where Triton can run (a CUDA device, or TRITON_INTERPRET=1), the PyTorch
    references elsewhere; `triton` insists; `torch` always uses the references."""
    rms_norm: bool = True
    """Triton RMSNorm (Gemma's `1 + w` form too)."""
    rope: bool = True
    """Triton rotary embedding for q and k in one in-place launch, with per-token (packed) positions."""
    swiglu: bool = True
    """Triton SwiGLU / GeGLU."""
    cross_entropy: bool = True
    """Triton cross-entropy on materialised logits (used when the fused linear cross-entropy is off)."""
    fused_linear_cross_entropy: bool = True
    """Never materialise the full (tokens, vocab) logits: LM head and loss in one chunked kernel."""
    lora: bool = True
    """Fused LoRA projections: base matmul and rank-r update in the compute dtype with one autograd node
    per group of projections sharing an input (q/k/v, gate/up), instead of peft's fp32 detour. Plain
    PyTorch GEMMs (no Triton), so backend `auto` uses it on every device; backend `torch` keeps peft's
    forward. Layers it cannot compute (dropout > 0, DoRA, several adapters) and ZeRO-3-partitioned
    weights keep peft's forward."""
    dequantize_4bit: bool = True
    """With `lora` on a 4-bit (bitsandbytes) base: dequantize each weight with distsft's one-pass Triton
    kernel (bitwise equal to bitsandbytes, one launch instead of two or three) where Triton can run;
    false, or where it cannot: bitsandbytes' own `dequantize_4bit`."""
    on_unsupported: Literal["error", "warn"] = "error"
    """An architecture the patcher does not know: stop, or warn and train with the plain HF modules."""


@dataclass(kw_only=True)
class DistributedConfig:
    timeout_minutes: float = 10.0
    """Process-group timeout: a collective that waits longer fails the job instead of hanging it."""
    nonfinite_loss: Literal["skip", "abort"] = "skip"
    """A non-finite loss or gradient norm (decided on global values): skip the optimizer step (counted),
    or stop with exit code 65."""
    max_consecutive_nonfinite: int = 5
    """Abort after this many non-finite steps in a row even when skipping."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON (e.g. `ds_configs/zero3.json`) for runs started with plain `torchrun`; with
    `accelerate launch --config_file accelerate_configs/zeroN.yaml` the YAML names it instead."""
    allow_global_batch_change: bool = False
    """Allow resuming with a different global batch size (changes which samples form each step)."""
    zero3_gather: Literal["layer", "module"] = "layer"
    """ZeRO-3 only. `layer`: each decoder layer's parameters are gathered together before its forward and
    its backward, with no DeepSpeed hooks on the modules inside it (DeepSpeed's leaf modules), so the
    fused LoRA projections and the 4-bit dequantization kernel read whole weights and prefetching works
    per layer. `module`: DeepSpeed's default, a gather per module (the LoRA layers then run peft's
    forward; for comparison)."""
    zero3_fast_paths: bool = True
    """ZeRO-3 only. Replace ten pieces of DeepSpeed's per-step host work by equivalents that do the same
    with less Python (the decoder layers, with `zero3_gather=layer`, gathered and released on a fixed
    schedule instead of through DeepSpeed's trace-based coordinator; the model's module tree, walked
    twice per forward, listed once; its debug prints check whether they print before looking up the
    rank; each decoder layer's gradients moved into the reduce bucket together instead of one by one; a
    bucket's reduce-scatter laid out with one split per gradient instead of per-rank slices; the reduced
    gradient partitions copied into the optimizer's buffer in one foreach call instead of one copy per
    trainable tensor; the gradient norm in one foreach launch instead of one per trainable tensor; the
    parameters still held at the step released in one call instead of one per parameter, and the
    persistent ones gathered again after it in one coalesced call instead of one all-gather each; with a
    fused AdamW, a step whose gradients are not finite skipped on the device instead of the host waiting
    for the norm; distsft/zero3_host.py).
    `false` runs DeepSpeed's own code, e.g. to compare or after a DeepSpeed upgrade changed those internals."""
    zero12: Literal["auto", "deepspeed", "ddp"] = "auto"
    """ZeRO-1/2 configs. ZeRO-1/2 partition only the trainable state (its gradients and Adam moments),
    and the base model is replicated on every GPU anyway. `auto` runs such a job as DDP (the same math,
    the same checkpoints, no DeepSpeed per-step cost) when partitioning would save less than 1 GiB per
    GPU (12 bytes per trainable parameter x (1 - 1/GPUs)) and the JSON offloads nothing; `deepspeed`
    always uses DeepSpeed; `ddp` always DDP."""

    def __post_init__(self):
        _require(self.timeout_minutes > 0, "timeout_minutes", "must be > 0")
        _require(self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "must be >= 1")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (loadable with `load_config`), with any secret typed into one
        of its strings replaced by "***" (distsft.redaction.redact_config)."""
        Path(path).write_text(yaml.safe_dump(redact_config(self.to_dict()), sort_keys=False))


# ----------------------------------------------------------------------------------------------------
# Building a config from plain data, with checked types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _wants_text(tp: Any) -> bool:
    """A setting that holds a string (or null): `str`, `str | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args == [str]
    return tp is str


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (coercing str/int where unambiguous); raise ConfigError."""
    if isinstance(value, _Typed):  # a dotted override whose YAML value would not give back its text
        if _wants_text(tp):
            value = value.text
        elif value.comment is not None:
            raise ConfigError(key, f"{value.text!r}: ' #' starts a YAML comment, which would drop "
                                   f"{value.comment!r}; remove it, or quote the value")
        else:
            value = value.value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # a value that already has one of the types stays as it is
            if typing.get_origin(arg) is None and isinstance(value, arg) and not isinstance(value, bool):
                return value
        for arg in args:
            if arg is type(None):
                continue
            with contextlib.suppress(ConfigError):
                return _coerce(value, arg, key)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not (dataclasses.is_dataclass(item_tp)):
            value = [value]  # `report_to=wandb` means `[wandb]`
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if tp is DataSourceConfig and hasattr(value, "column_names"):
            value = {"path": value}  # `sources: [dataset]` means `sources: [{path: dataset}]`
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# Names people bring from other trainers, mapped to ours for the "did you mean" hint.
_ALIASES = {
    "lr": "learning_rate", "batch_size": "per_device_train_batch_size", "micro_batch_size":
    "per_device_train_batch_size", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
    "grad_accum": "gradient_accumulation_steps", "gradient_accumulation": "gradient_accumulation_steps",
    "scheduler": "lr_scheduler_type", "lr_scheduler": "lr_scheduler_type", "warmup": "warmup_ratio",
    "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm", "optimizer": "optim",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "seq_len": "max_seq_len",
    "sequence_len": "max_seq_len", "max_length": "max_seq_len", "model_name": "name_or_path",
}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and ill-typed values by dotted key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in data.items():
        if cls is DataSourceConfig and k == "path" and hasattr(v, "column_names"):
            kwargs[k] = v  # a `datasets.Dataset` from Python: __post_init__ keeps it beside its handle
            continue
        if k not in names:
            near = [_ALIASES[k]] if _ALIASES.get(k) in names else difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {_join(prefix, near[0])}?)" if near else f" (known: {', '.join(names)})"
            raise ConfigError(_join(prefix, str(k)), "unknown key" + hint)
        kwargs[k] = _coerce(v, hints[k], _join(prefix, k))
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in kwargs
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(_join(prefix, missing[0]), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # from __post_init__: the key is relative to this section
        raise ConfigError(_join(prefix, e.key), e.message) from None


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


@dataclass(frozen=True)
class _Typed:
    """A dotted override whose YAML reading does not give back the text typed: a number or a boolean
    (`0123` is 83, `2024_01` is 202401, `yes` is true), or a value with a YAML comment (`runs/exp #2` is
    `runs/exp`). A string setting takes the text as typed; any other takes `value`, or refuses a comment."""

    value: Any
    text: str
    comment: str | None = None


def _yaml_comment(raw: str) -> str | None:
    """The YAML comment in `raw` (from a `#` at the start or after whitespace, outside every token:
    quoted scalars keep theirs), or None."""
    try:
        spans = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(raw)]
    except yaml.YAMLError:
        return None
    for i, ch in enumerate(raw):
        if ch == "#" and (i == 0 or raw[i - 1].isspace()) and not any(a <= i < b for a, b in spans):
            return raw[i:].strip()
    return None


def parse_override(arg: str) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 1e-4). Values are YAML scalars/lists/maps,
    but nothing typed is silently lost: a string setting gets the text as typed when YAML would read it
    otherwise (`train.output_dir=runs/exp #2` is "runs/exp #2", not "runs/exp" with a comment;
    `logging.run_name=0123` is "0123"), and a comment in any other setting is refused."""
    if "=" not in arg:
        raise ConfigError(arg, "expected an override of the form section.key=value")
    key, raw = arg.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(key or arg, "malformed key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key, raw  # an unparsable value stays a string; the type check names the key if it is wrong
    comment = _yaml_comment(raw)
    if comment is not None or isinstance(value, (bool, int, float)):
        return key, _Typed(value, raw.strip(), comment)
    return key, value


# The dataclass defaults above are the embedded demo's (a 4-layer random-init model on 400 rows). A run
# file, command line or dict that names a pretrained model (`model.name_or_path`) gets these instead for
# every key it does not set: values for LoRA on a real model.
PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"max_seq_len": 2048},
    "train": {"learning_rate": 2e-4, "num_train_epochs": 3.0, "warmup_ratio": 0.03},
    "checkpoint": {"save_steps": 500},
}


def build_config(tree: dict[str, Any]) -> Config:
    """A validated `Config` from a mapping of sections (YAML, dotted overrides, or a dict from Python),
    with `PRETRAINED_DEFAULTS` filled in where the mapping names `model.name_or_path`."""
    model = tree.get("model")
    named = isinstance(model, dict) and model.get("name_or_path") is not None or (
        isinstance(model, ModelConfig) and model.name_or_path is not None)
    if named:
        tree = dict(tree)
        for section, values in PRETRAINED_DEFAULTS.items():
            given = tree.get(section)
            if given is None:
                tree[section] = dict(values)
            elif isinstance(given, dict):
                tree[section] = {**values, **given}
    return from_dict(Config, tree)


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """YAML run file (optional) + dotted overrides -> a validated `Config`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"no such file: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("--config", f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for arg in overrides:
        key, value = parse_override(arg)
        _set_dotted(tree, key, value)
    return build_config(tree)
