"""MFU formula against hand computations (numbers written out, not recomputed by the code under test)."""

import pytest
import torch

from distsft.flops import (
    doc_lengths_from_position_ids,
    matmul_params,
    mfu,
    peak_flops,
    train_flops,
    trainable_params,
)

# Llama-3.1-8B shape, as its HF config.json spells it.
LLAMA_31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# Hand computation, per layer:
#   q_proj 4096*4096 = 16,777,216    k_proj 4096*1024 = 4,194,304    v_proj 4,194,304
#   o_proj 4096*4096 = 16,777,216    gate/up/down 3 * 4096*14336 = 176,160,768
#   layer total = 218,103,808;  x 32 layers = 6,979,321,856
#   lm_head 4096*128256 = 525,336,576  (embed_tokens excluded)
#   N = 7,504,658,432
N_LLAMA_8B = 7_504_658_432
# LoRA r=16 on all seven projections, per layer: r*(in+out) summed
#   q 16*8192 = 131,072  k 16*5120 = 81,920  v 81,920  o 131,072  gate/up/down 3 * 16*18432 = 884,736
#   = 1,310,720 per layer; x 32 = 41,943,040 (what peft reports for this model)
LORA_R16 = 41_943_040


def test_matmul_params_llama_8b():
    assert matmul_params(LLAMA_31_8B) == N_LLAMA_8B


def test_matmul_params_counts_tied_lm_head():
    """The LM head is a matmul even when its weight is the input embedding's."""
    assert matmul_params({**LLAMA_31_8B, "tie_word_embeddings": True}) == N_LLAMA_8B


@pytest.mark.parametrize(
    "length, expected",
    [
        # matmuls: 4 * N * L = 4 * 7,504,658,432 * 2048 = 61,478,161,874,944
        # attention: 6 * layers * heads * head_dim * L^2 = 6 * 32 * 32 * 128 * 4,194,304 = 3,298,534,883,328
        (2048, 61_478_161_874_944 + 3_298_534_883_328),  # = 64,776,696,758,272
        # matmuls: 4 * 7,504,658,432 * 8192 = 245,912,647,499,776
        # attention: 6 * 32 * 32 * 128 * 67,108,864 = 52,776,558,133,248
        (8192, 245_912_647_499_776 + 52_776_558_133_248),  # = 298,689,205,633,024
    ],
)
def test_train_flops_llama_8b_one_document(length, expected):
    assert train_flops(LLAMA_31_8B, [length]) == expected
    assert train_flops(LLAMA_31_8B, torch.tensor([length])) == expected


def test_train_flops_lora_adds_six_per_adapter_param():
    # 6 * 41,943,040 * 2048 = 515,396,075,520 on top of 64,776,696,758,272
    assert train_flops(LLAMA_31_8B, [2048], lora_params=LORA_R16) == 65_292_092_833_792


def test_attention_is_per_document():
    """Two packed 1024-token documents: same matmul FLOPs as one 2048 document, half the attention."""
    # attention: 6 * 32 * 32 * 128 * (1024^2 + 1024^2) = 786,432 * 2,097,152 = 1,649,267,441,664
    assert train_flops(LLAMA_31_8B, [1024, 1024]) == 61_478_161_874_944 + 1_649_267_441_664


def test_mfu_llama_8b_hand_computed():
    # 6,927 tokens/s (HF+PEFT, H100, 2 x 2048): 6927 * (64,776,696,758,272 / 2048) FLOP/s
    #   = 6927 * 31,629,246,464 = 219,095,790,256,128 FLOP/s; / 989.4e12 = 0.221443...
    per_token = train_flops(LLAMA_31_8B, [2048]) / 2048
    assert per_token == 31_629_246_464
    got = mfu(6927 * per_token, peak_flops("NVIDIA H100 80GB HBM3"))
    assert got == pytest.approx(219_095_790_256_128 / 989.4e12, rel=1e-12)
    assert got == pytest.approx(0.22144, abs=1e-5)


def test_gated_vs_plain_mlp_and_moe():
    tiny = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 10, "hidden_act": "silu"}
    # q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; MLP 3*8*16 = 384; head 8*10 = 80
    assert matmul_params(tiny) == 192 + 384 + 80
    moe = {**tiny, "num_local_experts": 4, "num_experts_per_tok": 2}
    # router 8*4 = 32; two experts 2 * 384 = 768
    assert matmul_params(moe) == 192 + 32 + 768 + 80


def test_doc_lengths_from_position_ids_packed_and_padded():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0],
                        [0, 1, 2, 3, 4, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1, 1]])
    assert doc_lengths_from_position_ids(pos, mask).tolist() == [3, 2, 5, 3]
    assert doc_lengths_from_position_ids(pos).tolist() == [3, 2, 1, 1, 1, 5, 3]


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA B200", 2250.0),
    ],
)
def test_peak_table(name, tflops):
    assert peak_flops(name) == pytest.approx(tflops * 1e12)


def test_peak_unknown_cpu_and_override():
    assert peak_flops("cpu") is None
    assert peak_flops(None) is None
    assert peak_flops("Some Future GPU") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    assert mfu(1e12, None) is None


def test_trainable_params_uses_ds_numel():
    lin = torch.nn.Linear(4, 3)  # 15 params
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    model = torch.nn.Sequential(lin, frozen)
    assert trainable_params(model) == 15
    lin.weight.ds_numel = 1000  # a ZeRO-3 partitioned parameter reports its full size here
    assert trainable_params(model) == 1003
