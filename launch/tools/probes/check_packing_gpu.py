"""The packing self-check on a real shape on the GPU, for every attention path: prints the measured
difference between documents packed into one row and the same documents alone, and the tolerance.

    python launch/tools/probes/check_packing_gpu.py --shape llama3-8b
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from distsft import attention
from distsft.attention import PackingIsolationError, check_packing_isolation, packed_attention_kwargs
from distsft.config import KernelsConfig
from distsft.loss import select_loss_fn
from distsft.model import CausalLMWithLoss
from distsft.patching import apply_kernels

SHAPES = Path(__file__).resolve().parents[2] / "shapes"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    args = ap.parse_args()
    attention.register()
    config = AutoConfig.from_pretrained(SHAPES / args.shape)
    for impl in ("distsft_varlen", "sdpa"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=impl)
        model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        apply_kernels(model, KernelsConfig())
        wrapper = CausalLMWithLoss(model, select_loss_fn(KernelsConfig()))

        def probe(ids, pos, mask, impl=impl, wrapper=wrapper):
            kw = {} if mask is None else {"attention_mask": mask.cuda()}
            if impl == "distsft_varlen":
                kw = packed_attention_kwargs(pos, impl, torch.bfloat16)
            return wrapper.logits(ids.cuda(), pos.cuda(), **kw)

        try:
            print(impl, check_packing_isolation(hf, attn_implementation=impl, forward=probe), flush=True)
        except PackingIsolationError as e:
            print(impl, "FAILED:", e, flush=True)
        del hf, model, wrapper
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
