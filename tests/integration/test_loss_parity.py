"""Loss parity (issue 7 item 3): distsft's model path and plain HF+PEFT train the same loss curve.

Both start from the same seed (a 2-layer Llama built from its config with random weights, fp32, LoRA r=16
alpha 32 on every linear layer: parameters asserted identical before the first step) and run 50 AdamW
steps (lr 1e-3, gradient clipping at 1.0) on the same batches of real data: the first 600 GSM8K rows of
../shared/data (the embedded demo rows when that folder is absent) through distsft's data pipeline with
the demo tokenizer, unpacked, 2 rows of <= 128 tokens per step.

  ours  `distsft.model.build_model` with the default `KernelsConfig` (every kernel on: Triton RMSNorm,
        RoPE, SwiGLU and fused linear cross-entropy under TRITON_INTERPRET=1, fused LoRA projections),
        loss = summed token loss / target tokens, as `distsft/train.py` computes it for one micro-batch
  hf    `AutoModelForCausalLM` + `get_peft_model`, `model(input_ids, labels=labels).loss`, where `labels`
        are built so that HF's internal shift yields exactly our targets (labels[:, 1:] = targets[:, :-1])

Tolerance: max over the 50 steps of |loss_ours - loss_hf| <= 5e-6, the loss being ~7.6 (ln 2048 at init,
~7.55 after 50 steps). Measured on CPU (torch 2.13, transformers 5.23, peft 0.21.2): largest difference
1.4e-6 (3 float32 ulps at 7.6), mean 4.3e-7; 9.5e-7 on another subset of the same data (short rows).
That is fp32 round-off (other summation orders in the kernels, the fused LoRA and the loss reduction)
carried through 50 optimizer steps, so 5e-6 is ~3.5x the largest measured. It holds for a stably trained
setting, not for any: on that other subset lr 5e-3 gave 1e-5, and lr 2e-2, where the loss spikes, 3e-2
(round-off amplified by unstable steps). Real differences land far above it (measured on this setup):
RMSNorm eps 1e-4 instead of 1e-5 moves the first loss by 2.4e-3, HF labels shifted one position too far
by 9e-3 at the first step and 7e-2 at the third.
"""

import json

import pytest
import torch
from _support import DEMO_TOKENIZER, REPO, SHARED_DATA, write_tiny_llama

from distsft.config import DataConfig, DataSourceConfig, KernelsConfig, LoraConfig, ModelConfig
from distsft.data import GlobalBatchSampler, build_datasets, collate
from distsft.loss import IGNORE_INDEX
from distsft.model import build_model, load_tokenizer

pytestmark = pytest.mark.integration

STEPS, BATCH, SEQ, SEED, LR = 50, 2, 128, 1234, 1e-3
TOLERANCE = 5e-6


def _batches(tmp, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The first 600 GSM8K rows through distsft's data pipeline (chat template, label mask, rows over
    SEQ tokens dropped: ~190 remain), in GlobalBatchSampler order. 600 rows, not 7,473: tokenizing
    all of them would dominate the test's time."""
    gsm8k = SHARED_DATA / "gsm8k_train_alpaca.json"
    if gsm8k.is_file():
        rows = json.loads(gsm8k.read_text())[:600]
    else:  # a clone without ../shared: the embedded demo rows (GSM8K too; ~130 remain)
        rows = [json.loads(line) for line in (REPO / "distsft/assets/gsm8k-demo/train.jsonl").open()]
    source = tmp / "gsm8k.json"
    source.write_text(json.dumps(rows))
    cfg = DataConfig(sources=[DataSourceConfig(path=str(source))], max_seq_len=SEQ, packing=False,
                     max_drop_ratio=1.0, cache_dir="none", progress_bar=False)
    data = build_datasets(cfg, tokenizer, seed=SEED).train
    sampler = iter(GlobalBatchSampler(len(data), BATCH, seed=SEED, rank=0, world_size=1, micro_batch_size=BATCH))
    return [collate([data[i] for i in next(sampler)], pad_token_id=tokenizer.pad_token_id) for _ in range(STEPS)]


def _hf_model(model_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    # The seeding distsft.model.build_model does: the base drawn from `seed` without touching the global
    # RNG, then LoRA A drawn from the global RNG.
    torch.manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32,
                                                attn_implementation="sdpa")
    base.config.use_cache = False
    return get_peft_model(base, PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))


def _train(params, step_loss, batches) -> list[float]:
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for mb in batches:
        loss = step_loss(mb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    model_dir = write_tiny_llama(tmp / "model")
    model_cfg = ModelConfig(init_from_config=str(model_dir), tokenizer=DEMO_TOKENIZER, dtype="float32",
                            attn_implementation="sdpa")
    tokenizer = load_tokenizer(model_cfg)
    batches = _batches(tmp, tokenizer)

    torch.manual_seed(SEED)
    ours, report = build_model(model_cfg, LoraConfig(r=16, alpha=32.0), KernelsConfig(), torch.device("cpu"),
                               seed=SEED)
    hf = _hf_model(model_dir)
    ours_params = dict(ours.peft_model.named_parameters())
    hf_params = dict(hf.named_parameters())
    assert ours_params.keys() == hf_params.keys()
    for name, p in hf_params.items():
        assert torch.equal(p, ours_params[name]) and p.requires_grad == ours_params[name].requires_grad, name

    def ours_loss(mb):
        s, n = ours(input_ids=mb["input_ids"], target_ids=mb["target_ids"], position_ids=mb["position_ids"])
        return s / n

    def hf_loss(mb):
        targets = mb["target_ids"]
        assert (targets[:, -1] == IGNORE_INDEX).all()  # HF's shift drops the last position's target
        labels = torch.full_like(targets, IGNORE_INDEX)
        labels[:, 1:] = targets[:, :-1]  # HF: the target of position i is labels[i + 1]
        return hf(input_ids=mb["input_ids"], labels=labels).loss

    ours.train()
    hf.train()
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]
    return {"ours": _train(trainable(ours), ours_loss, batches), "hf": _train(trainable(hf), hf_loss, batches),
            "report": report, "targets": sum(int(mb["target_ids"].ne(IGNORE_INDEX).sum()) for mb in batches)}


def test_loss_curves_agree_over_50_steps(curves):
    ours, hf = curves["ours"], curves["hf"]
    assert len(ours) == len(hf) == STEPS
    diffs = [abs(a - b) for a, b in zip(ours, hf, strict=True)]
    worst = max(range(STEPS), key=diffs.__getitem__)
    print(f"max |loss diff| {diffs[worst]:.3g} at step {worst + 1}; mean {sum(diffs) / STEPS:.3g}; "
          f"loss {ours[0]:.4f} -> {ours[-1]:.4f}; {curves['targets']} target tokens; kernels: {curves['report']}")
    assert diffs[worst] <= TOLERANCE, (worst + 1, ours[worst], hf[worst])


def test_the_kernels_ran_and_the_model_learned(curves):
    """The parity is not vacuous: our path really ran the patched kernels, and both curves move."""
    counts = curves["report"].counts
    assert counts.get("rms_norm") == 5 and counts.get("rope") == 2 and counts.get("swiglu") == 2, counts
    assert curves["report"].backend == "auto"
    ours = curves["ours"]
    first, last = sum(ours[:5]) / 5, sum(ours[-10:]) / 10
    assert last < first - 0.05, ours
