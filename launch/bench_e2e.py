"""End-to-end LoRA SFT throughput: distsft against HF+PEFT and HF+PEFT+Liger, side by side, one GPU.

    python launch/bench_e2e.py --case llama3-8b:2x2048 --case llama3-8b:1x8192 --case llama3-1b:8x2048 \
        --out launch/results/e2e_h100.md

Every provider trains the same random-initialised model of a real shape (`launch/shapes/`; speed does not
depend on the weights) with the same loop: LoRA r=16, alpha 32 on all seven projections, bf16 weights,
torch AdamW (fused), random tokens, loss on every position, `--steps` timed steps after `--warmup`
(median). Each (case, provider) runs in a fresh subprocess, so Liger's class-level patches and the CUDA
allocator's peak never leak between them.

  hf      transformers + peft, SDPA, `model(input_ids, labels=...)`
  liger   the same plus `apply_liger_kernel_to_<arch>(rope, rms_norm, swiglu, fused_linear_cross_entropy)`
  hf-bf16-adapters, liger-bf16-adapters  the same with peft's adapters cast to bf16 after get_peft_model
          (peft keeps them fp32 by default and casts each projection's input to fp32)
  distsft our model path: `distsft.model.CausalLMWithLoss` with `apply_kernels` + `select_loss_fn`
          (the module `distsft/train.py` trains), summed loss / token count, same optimizer

Printed per row: tokens/s, model TFLOP/s (distsft.flops: 4N per token for the frozen base + 6 per LoRA
parameter + causal attention), MFU against the bf16 matmul ceiling measured in this run (8192^3), peak
allocated and reserved memory, and the largest |loss - HF loss| over all `--warmup` + `--steps` steps
(same seed, same batches: a parity check, not only a speed number). `--gc` turns on gradient checkpointing for all.
`--real-data FILE` adds a distsft row that trains on FILE packed into `seq`-token slots with the data
pipeline and reports effective (non-padding) tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = ("hf", "liger", "distsft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_ceiling() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0)


def build_qlora(shape: str, gc: bool, offload: bool, bnb_dequant: bool = False, keep_dequant: bool = False,
                attn: str = "sdpa"):
    """distsft's QLoRA path: random weights quantized to NF4 (double quantization) layer by layer while drawn,
    LoRA on top, our kernels, through the trainer's own `build_model`."""
    import torch

    from distsft import qlora
    from distsft.config import KernelsConfig, LoraConfig, ModelConfig
    from distsft.model import build_model
    from distsft.recompute import device_checkpoint, offloaded_checkpoint

    qlora.KEEP_RECOMPUTED_DEQUANT = keep_dequant
    wrapper, _ = build_model(
        ModelConfig(init_from_config=str(REPO / "launch" / "shapes" / shape), dtype="bfloat16", load_in_4bit=True,
                    attn_implementation=attn),
        LoraConfig(r=16, alpha=32, target_modules=TARGETS), KernelsConfig(dequantize_4bit=not bnb_dequant),
        torch.device("cuda"), seed=0)
    if gc:
        for layer in wrapper.causal_lm.model.layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = offloaded_checkpoint if offload else device_checkpoint

    def loss(ids):
        s, n = wrapper(**_next_token_targets(ids), **_rows_as_documents(ids, attn))
        return s / n

    return wrapper, wrapper.config, loss


def _next_token_targets(ids) -> dict:
    """distsft's batch for next-token loss on `ids`: the same positions HF's shifted `labels=` loss covers, and
    which flat positions have a target, as the trainer passes it (from host labels there; known here
    without a sync)."""
    import torch

    from distsft.loss import IGNORE_INDEX

    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    index = torch.arange(ids.numel(), device=ids.device).view(ids.shape)[:, :-1].reshape(-1)
    return {"input_ids": ids, "target_ids": targets, "target_index": index}


def _rows_as_documents(ids, attn: str) -> dict:
    """distsft_varlen: each row one document (the same causal attention as SDPA's), its lengths passed as the
    trainer passes packed ones (on the device, no sync); nothing for the other backends."""
    if attn != "distsft_varlen":
        return {}
    import torch

    from distsft.attention import packed_attention_kwargs

    key = (*ids.shape, ids.device)
    if key not in _ROWS:
        kw = packed_attention_kwargs(torch.arange(ids.shape[1]).repeat(ids.shape[0], 1), attn, torch.bfloat16)
        _ROWS[key] = {k: v.to(ids.device) if torch.is_tensor(v) else v for k, v in kw.items()}
    return _ROWS[key]


_ROWS: dict = {}


def build(provider: str, shape: str, gc: bool, attn: str = "sdpa", offload: bool = False, qlora: bool = False,
          **qlora_options):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "launch" / "shapes" / shape)
    if qlora:
        return build_qlora(shape, gc, offload, attn=attn, **qlora_options)
    if provider.startswith("liger"):
        import liger_kernel.transformers as lk

        getattr(lk, f"apply_liger_kernel_to_{config.model_type}")(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    if attn == "distsft_varlen":
        from distsft import attention

        attention.register()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    if provider.endswith("-bf16-adapters"):  # peft's fp32 adapters cast to bf16: no fp32 copy of x per projection
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if provider != "distsft":
        return peft_model, config, lambda ids: peft_model(input_ids=ids, labels=ids).loss
    from distsft.config import KernelsConfig
    from distsft.loss import select_loss_fn
    from distsft.model import CausalLMWithLoss
    from distsft.patching import apply_kernels

    kcfg = KernelsConfig()
    apply_kernels(peft_model, kcfg)
    if gc:  # distsft's own checkpoint (the recompute skips the down projection), inputs on host with offload
        from distsft.recompute import device_checkpoint, offloaded_checkpoint

        for layer in model.model.layers:
            layer._gradient_checkpointing_func = offloaded_checkpoint if offload else device_checkpoint
    wrapper = CausalLMWithLoss(peft_model, select_loss_fn(kcfg))

    def loss(ids):
        s, n = wrapper(**_next_token_targets(ids), **_rows_as_documents(ids, attn))
        return s / n

    return wrapper, config, loss


def worker(args) -> dict:
    import torch

    from distsft.flops import train_flops

    attn = args.attn if args.worker == "distsft" else "sdpa"
    model, config, loss_fn = build(args.worker, args.shape, args.gc, attn=attn, offload=args.offload,
                                   qlora=args.qlora, bnb_dequant=args.bnb_dequant, keep_dequant=args.keep_dequant)
    params = [p for p in model.parameters() if p.requires_grad]
    lora = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1234)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
               for _ in range(args.warmup + args.steps)]
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, ids in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step = statistics.median(times)
    tokens = args.batch * args.seq
    flops = train_flops(config, [args.seq] * args.batch, lora_params=lora)
    out = {"tokens_per_s": tokens / step, "tflops": flops / step / 1e12, "step_s": step, "losses": losses,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    if args.profile:
        out["profile"] = profile_steps(lambda: (loss_fn(batches[0]).backward(), opt.step(),
                                                opt.zero_grad(set_to_none=True)))
    return out


def profile_steps(step_fn, steps: int = 2) -> dict:
    """Where a step's time goes: wall time, summed GPU kernel time (one stream: the GPU-busy time), the
    busy share, kernel launches, and the kernels with the most total time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6 / steps  # us -> s
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / steps  # ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": 1e3 * wall, "gpu_busy_ms": 1e3 * busy, "busy_share": busy / wall,
            "launches_per_step": len(kernels) / steps, "top_ms": [(n[:90], round(t, 2)) for n, t in top]}


def real_data_worker(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from distsft.config import DataConfig, DataSourceConfig
    from distsft.data import build_datasets as build_data
    from distsft.data import collate
    from distsft.train import to_device

    model, config, _ = build("distsft", args.shape, args.gc, attn=args.real_attn, offload=args.offload)
    tok = AutoTokenizer.from_pretrained(REPO / "distsft" / "assets" / "tiny-llama")
    data_cfg = DataConfig(sources=[DataSourceConfig(path=args.real_data)], max_seq_len=args.seq, progress_bar=False)
    data = build_data(data_cfg, tok, seed=0).train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times, real = [], []
    for i in range(args.warmup + args.steps):
        samples = [data[(i * args.batch + j) % len(data)] for j in range(args.batch)]
        # the trainer's own batch preparation: target positions and varlen lengths from the host batch, the
        # sdpa document mask built on the device
        mb = to_device(collate(samples, pad_token_id=tok.pad_token_id), torch.device("cuda"), data_cfg.packing,
                       args.real_attn, torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s, n = model(**mb)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            real.append(sum(len(x["input_ids"]) for x in samples))
    return {"tokens_per_s": sum(real) / sum(times), "packing_efficiency": data.packing_efficiency,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def run_one(case: str, provider: str, args) -> dict:
    shape, bt = case.split(":")
    batch, seq = (int(x) for x in bt.split("x"))
    cmd = [sys.executable, __file__, "--worker", provider, "--shape", shape, "--batch", str(batch), "--seq", str(seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--gc"] if args.gc else [])
    cmd += ["--offload"] if args.offload else []
    cmd += ["--qlora"] if args.qlora else []
    cmd += ["--attn", args.attn]
    cmd += ["--bnb-dequant"] if args.bnb_dequant else []
    cmd += ["--keep-dequant"] if args.keep_dequant else []
    cmd += ["--profile"] if args.profile and provider != "real" else []
    if provider == "real":
        cmd += ["--real-data", args.real_data, "--real-attn", args.real_attn]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", help="shape:BATCHxSEQ, e.g. llama3-8b:2x2048 (repeatable)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing for every provider")
    ap.add_argument("--qlora", action="store_true",
                    help="distsft only: the base quantized to NF4 while drawn (model.load_in_4bit)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "distsft_varlen"],
                    help="distsft rows: attention backend (distsft_varlen: each row passed as one document, as the "
                         "trainer passes packed ones)")
    ap.add_argument("--bnb-dequant", action="store_true",
                    help="with --qlora: bitsandbytes' dequantization instead of distsft's kernel "
                         "(kernels.dequantize_4bit=false)")
    ap.add_argument("--keep-dequant", action="store_true",
                    help="with --qlora --gc: keep the recompute's dequantized weights for the backward")
    ap.add_argument("--offload", action="store_true",
                    help="with --gc: distsft keeps checkpointed layers' inputs in pinned host memory")
    ap.add_argument("--real-data", help="also train distsft on this file, packed")
    ap.add_argument("--real-attn", default="distsft_varlen", choices=["distsft_varlen", "sdpa"],
                    help="attention for the packed real-data row (sdpa: with the block-diagonal float mask)")
    ap.add_argument("--out", help="write the table and its provenance (markdown) here")
    ap.add_argument("--profile", action="store_true",
                    help="also profile two steps per row: GPU-busy share of the step and the top kernels")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = real_data_worker(args) if args.worker == "real" else worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    ceiling = matmul_ceiling()
    rows = []
    for case in args.case or ["llama3-1b:8x2048"]:
        results = {p: run_one(case, p, args) for p in args.providers.split(",")}
        if args.real_data:
            results[f"distsft, packed real data ({args.real_attn})"] = run_one(case, "real", args)
        ref = results.get("hf", {}).get("losses")
        for name, r in results.items():
            if "error" in r:
                rows.append(f"| {case} | {name} | failed: {r['error']} | | | | |")
                continue
            parity = (f"{max(abs(a - b) for a, b in zip(r['losses'], ref, strict=True)):.3g}"
                      if ref and "losses" in r else "")
            tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
            mfu = f"{100 * r['tflops'] * 1e12 / ceiling:.1f}%" if "tflops" in r else ""
            note = f" (packing {100 * r['packing_efficiency']:.1f}%)" if "packing_efficiency" in r else ""
            rows.append(f"| {case} | {name}{note} | {r['tokens_per_s']:,.0f} | {tf} | {mfu} | "
                        f"{r['peak_alloc_gib']:.1f} / {r['peak_reserved_gib']:.1f} | {parity} |")
        print("\n".join(rows[-len(results):]), flush=True)
        for name, r in results.items():
            if "profile" in r:
                pr = r["profile"]
                print(f"profile {case} {name}: step {pr['wall_ms']:.1f} ms, GPU busy {pr['gpu_busy_ms']:.1f} ms "
                      f"({100 * pr['busy_share']:.0f}%), {pr['launches_per_step']:.0f} kernel launches per step; "
                      "top kernels (ms per step): " + "; ".join(f"{n} {t}" for n, t in pr["top_ms"]), flush=True)
    header = ("| case (shape:batch x seq) | provider | tokens/s | model TFLOP/s | MFU vs matmul ceiling | "
              "peak alloc / reserved GiB | max abs loss diff vs HF |\n| --- | --- | --- | --- | --- | --- | --- |")
    table = header + "\n" + "\n".join(rows)
    import transformers
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    provenance = (
        f"GPU: {torch.cuda.get_device_name()}; bf16 8192^3 matmul ceiling measured in this run: {ceiling / 1e12:.0f} "
        f"TFLOP/s; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
        f"commit {commit.stdout.strip() or 'unknown (no .git: see the results file)'}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; gradient checkpointing {'on' if args.gc else 'off'}"
        f"{' (distsft: inputs offloaded to host)' if args.gc and args.offload else ''}"
        f"{'; QLoRA (NF4 base, double quantization)' if args.qlora else ''}; "
        f"command: python launch/bench_e2e.py {' '.join(sys.argv[1:])}"
    )
    print(f"\n{table}\n\n{provenance}")
    if args.out:
        Path(args.out).write_text(f"{table}\n\n{provenance}\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
