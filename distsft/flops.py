"""Training FLOPs of LoRA on a frozen base, and model FLOPs utilisation (MFU).

The formula (per optimizer step; sums run over every document in the step, on all ranks):

    train_flops = sum_docs [ L * (4 * N  +  6 * P_lora  +  2 * P_full)  +  6 * n_layers * n_heads * head_dim * L^2 ]

- `L`: a document's length in tokens (packed documents counted separately, padding excluded).
- `N`: parameters of every matmul the tokens go through: per layer q, k, v, o projections
  (`d * n_heads*head_dim`, `d * n_kv*head_dim` twice, `n_heads*head_dim * d`) and the MLP (`3 * d * d_ff`
  for a gated MLP such as SwiGLU; for a mixture of experts the experts a token is routed to, the shared
  experts and the router), times `n_layers`, plus the LM head `d * V`, which is a matmul whether or not
  it is tied to the input embeddings. The embedding lookup is not a matmul and is excluded, as are norms,
  RoPE and activations (O(d) per token).
- `4 * N`: a frozen weight costs 2 FLOPs per parameter per token forward (one multiply-add) and 2 in the
  backward pass for the gradient of its input; its weight gradient (another 2) is never computed. (The
  q/k/v input gradient of the first layer is not needed either; ignoring that overstates N by < 1 %.)
- `6 * P_lora`: adapter weights are trained: forward 2, input gradient 2, weight gradient 2 per parameter.
  `2 * P_full`: base matmul weights trained in full (`modules_to_save` such as `lm_head`) already count
  4 in `N` and add their weight gradient.
- Attention (no weights, so forward and backward both count): per layer and head, `Q K^T` is
  `2 * L * L * head_dim` FLOPs and `P V` another `2 * L * L * head_dim` for full attention; a causal mask
  halves both, so the forward pass is `2 * L^2 * n_heads * head_dim` per layer. The backward pass runs
  four matmuls of the same size (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q), twice the forward, so
  training costs 3x the forward: `6 * n_layers * n_heads * head_dim * L^2` per document. It is quadratic
  in each document's length, not in the packed row's, because attention never crosses documents. GQA
  does not change it (every query head attends); sliding-window layers are counted as full causal.

MFU = achieved model FLOP/s per GPU / the GPU's peak dense bf16 FLOP/s. This counts model FLOPs only
(PaLM's definition): recomputation from gradient checkpointing is work done but not counted, so MFU with
checkpointing on is lower than the hardware's utilisation (HFU).

Example (Llama-3.1-8B shape, one 2048-token document): N = 7,504,658,432, so the matmuls cost
4 * N * 2048 = 6.148e13 and attention 6 * 32 * 32 * 128 * 2048^2 = 3.299e12: 31.6 GFLOP per token
before the adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _text_config(cfg: Any) -> Any:
    """Multimodal configs hold the language model's shape under `text_config`."""
    if _get(cfg, "hidden_size") is None and _get(cfg, "text_config") is not None:
        return _get(cfg, "text_config")
    return cfg


def _shape(model_config: Any) -> dict[str, int]:
    cfg = _text_config(model_config)
    hidden = _get(cfg, "hidden_size")
    n_layers = _get(cfg, "num_hidden_layers")
    n_heads = _get(cfg, "num_attention_heads")
    vocab = _get(cfg, "vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", n_layers),
                              ("num_attention_heads", n_heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: cannot count its FLOPs")
    head_dim = _get(cfg, "head_dim") or hidden // n_heads
    return {
        "hidden": int(hidden),
        "n_layers": int(n_layers),
        "n_heads": int(n_heads),
        "n_kv_heads": int(_get(cfg, "num_key_value_heads") or n_heads),
        "head_dim": int(head_dim),
        "vocab": int(vocab),
    }


def _mlp_params(cfg: Any, hidden: int) -> int:
    """Matmul parameters of one layer's MLP that each token goes through."""
    top_k = _get(cfg, "num_experts_per_tok")
    n_experts = _get(cfg, "num_local_experts") or _get(cfg, "num_experts") or _get(cfg, "n_routed_experts")
    if top_k and n_experts:
        # Mixture of experts: the router, top-k routed experts, and shared experts where the model has them.
        expert_ff = _get(cfg, "moe_intermediate_size") or _get(cfg, "intermediate_size")
        shared_ff = _get(cfg, "shared_expert_intermediate_size") or 0
        n_shared = _get(cfg, "n_shared_experts") or 0
        if n_shared and not shared_ff:
            shared_ff = n_shared * expert_ff
        return hidden * int(n_experts) + int(top_k) * 3 * hidden * int(expert_ff) + 3 * hidden * int(shared_ff)
    d_ff = _get(cfg, "intermediate_size") or 4 * hidden
    # Gated MLPs (SwiGLU/GeGLU: gate, up, down) are what Llama, Mistral, Qwen, Gemma and Phi-3 use;
    # GPT-2-style configs name their activation `activation_function` and have two matrices.
    n_mats = 2 if _get(cfg, "activation_function") is not None and _get(cfg, "hidden_act") is None else 3
    return n_mats * hidden * int(d_ff)


def matmul_params(model_config: Any) -> int:
    """N: parameters of the matmuls a token passes through (all linear layers and the LM head, no
    embeddings). `model_config` is an HF `PretrainedConfig` or a dict of its fields."""
    s = _shape(model_config)
    d, q_dim, kv_dim = s["hidden"], s["n_heads"] * s["head_dim"], s["n_kv_heads"] * s["head_dim"]
    attn = d * q_dim + 2 * d * kv_dim + q_dim * d  # q, k, v, o
    per_layer = attn + _mlp_params(_text_config(model_config), d)
    lm_head = d * s["vocab"]  # a matmul even when tied to the input embedding
    return s["n_layers"] * per_layer + lm_head


def _length_sums(doc_lengths: Any) -> tuple[int, int]:
    """(sum L, sum L^2) over documents, in exact Python integers."""
    if hasattr(doc_lengths, "tolist"):  # a torch tensor or numpy array, without importing either
        doc_lengths = doc_lengths.tolist()
    if isinstance(doc_lengths, int):
        doc_lengths = [doc_lengths]
    lengths = [int(n) for n in _flatten(doc_lengths)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"document lengths must be >= 0, got {min(lengths)}")
    return sum(lengths), sum(n * n for n in lengths)


def _flatten(xs: Iterable[Any]) -> Iterable[Any]:
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from _flatten(x)
        else:
            yield x


def train_flops(model_config: Any, doc_lengths: Any, lora_params: int = 0, full_params: int = 0) -> float:
    """Model FLOPs of one training pass (forward + backward) over documents of these lengths.

    `doc_lengths`: one length per document (list, 1-D tensor or array), padding excluded; see
    `doc_lengths_from_position_ids` for packed batches. `lora_params`: trainable adapter parameters.
    `full_params`: base matmul parameters trained in full (e.g. `lm_head` in `modules_to_save`).
    """
    s = _shape(model_config)
    tokens, sq = _length_sums(doc_lengths)
    per_token = 4 * matmul_params(model_config) + 6 * int(lora_params) + 2 * int(full_params)
    attention = 6 * s["n_layers"] * s["n_heads"] * s["head_dim"] * sq
    return float(tokens * per_token + attention)


def doc_lengths_from_position_ids(position_ids: Any, attention_mask: Any = None) -> Any:
    """Document lengths of a packed batch (B, T): a document starts where its position id is 0 (and at
    each row's first real token); tokens where `attention_mask` is 0 (padding) are not counted.
    Returns a 1-D int64 tensor."""
    import torch

    pos = torch.as_tensor(position_ids)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    keep = torch.ones_like(pos, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    first_kept = keep & (keep.long().cumsum(dim=1) == 1)
    starts = ((pos == 0) & keep) | first_kept
    flat_starts = starts[keep]  # row-major: rows stay in order, so each row's first token starts a doc
    if flat_starts.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    doc_id = flat_starts.long().cumsum(0) - 1
    return torch.bincount(doc_id).to(torch.int64)


def trainable_params(model: Any) -> int:
    """Trainable parameter count; under ZeRO-3 a partitioned parameter's full size is `ds_numel`."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)


# Peak dense (no 2:4 sparsity) BF16 tensor-core TFLOP/s with FP32 accumulation, per GPU, from the vendor
# spec sheets: NVIDIA H100 datasheet (SXM 989.4, PCIe 756.5, NVL 835.5: the sheet's sparse figures
# halved), H200 datasheet (SXM 989.4, NVL 835.5), GH200 datasheet (989), A100 datasheet (312, SXM and
# PCIe), L40S datasheet (362.05), L40 datasheet (181.05), L4 datasheet (121), A10 datasheet (125; AWS's
# A10G has no sheet of its own and is taken as the A10), Ada whitepaper appendix for the RTX 4090 (165.2
# with FP32 accumulate), Ampere GA102 whitepaper for the RTX A6000 (154.8), HGX B200 spec (2.25 PFLOP/s
# dense; GB200 2.5), AMD Instinct MI300X datasheet (1307.4). Order matters: first match wins.
_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"gb200", 2500.0),
    (r"b200", 2250.0),
    (r"h200.*nvl", 835.5),
    (r"gh200", 989.4),
    (r"h200", 989.4),
    (r"h100.*nvl", 835.5),
    (r"h100.*pcie", 756.5),
    (r"h100|h800", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"a100|a800", 312.0),
    (r"l40s", 362.05),
    (r"l40\b", 181.05),
    (r"\bl4\b", 121.0),
    (r"a10g|\ba10\b", 125.0),
    (r"rtx 4090", 165.2),
    (r"rtx a6000", 154.8),
    (r"mi300x", 1307.4),
]


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device (FLOP/s, not TFLOP/s); None when unknown (CPU, an
    unlisted GPU): then MFU is not reported. `override_tflops` (logging.peak_tflops) wins."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, tflops in _PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12
    return None


def mfu(flops_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device: its achieved model FLOP/s over its peak (None if unknown)."""
    if not peak:
        return None
    return flops_per_second / peak
