#!/usr/bin/env bash
# Where DDP's weak-scaling loss at 2 GPUs goes, on a 2-GPU host: NCCL's transport and all-reduce bandwidth
# between the two GPUs, then the 2-GPU DDP run of launch/bench_multigpu.py's scaling phase, then the same
# trainer run as two independent 1-GPU jobs at once (no communication: what sharing the host costs).
#
#   bash launch/tools/probes/ddp_contention.sh DATA.json [WORKDIR]    # WORKDIR default /tmp/mg, reused if present
#
# Prints the all-reduce times, the DDP row, and each solo job's median step / forward+backward / optimizer
# time over steps 4-13 (the trainer's metrics.jsonl).
set -euo pipefail
data=${1:?usage: ddp_contention.sh DATA.json [WORKDIR]}
work=${2:-/tmp/mg}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/../../.." && pwd)
mkdir -p "$work"
cat > "$work/allreduce.py" <<'EOF'
import time, torch, torch.distributed as dist
dist.init_process_group("nccl"); r = dist.get_rank(); torch.cuda.set_device(r)
for mb in (25, 168):  # DDP's bucket; an 8B LoRA's fp32 gradients
    x = torch.randn(mb * 2**20 // 4, device="cuda")
    for _ in range(5): dist.all_reduce(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): dist.all_reduce(x)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
    if r == 0: print(f"all_reduce {mb} MiB fp32: {dt*1e3:.2f} ms, bus bandwidth {mb/1024/dt:.1f} GiB/s")
dist.destroy_process_group()
EOF
echo "== NCCL all_reduce"
NCCL_DEBUG=INFO python3 -m torch.distributed.run --standalone --nproc_per_node 2 "$work/allreduce.py" 2>&1 \
  | grep -E "all_reduce|Channel 00/0 " | sort -u
echo "== DDP, 2 GPUs (bench_multigpu.py scaling)"
python3 "$here/launch/bench_multigpu.py" scaling --gpus 2 --modes ddp --data "$data" --data-rows 2000 \
  --workdir "$work" --deadline-s 250 --min-launch-s 60 --out "$work/ddp2.md" 2>&1 | grep -m1 "^| ddp"
echo "== two independent 1-GPU runs at once"
for g in 0 1; do
  CUDA_VISIBLE_DEVICES=$g python3 -m torch.distributed.run --standalone --nproc_per_node=1 "$here/distsft/train.py" \
    model.name_or_path="$work/models/llama3-8b-bfloat16" model.tokenizer=builtin:tiny-llama model.dtype=bfloat16 \
    model.gradient_checkpointing=false "data.sources=[{\"path\": \"$work/data-2000.json\"}]" data.max_seq_len=2048 \
    data.cache_dir="$work/cache" data.progress_bar=false train.per_device_train_batch_size=2 train.max_steps=13 \
    train.learning_rate=0.001 train.lr_scheduler_type=constant train.seed=1234 train.output_dir="$work/solo_$g" \
    checkpoint.save_steps=0 logging.logging_steps=1 logging.progress_bar=false > "$work/solo_$g.log" 2>&1 &
done
wait
python3 - "$work" <<'EOF'
import json, statistics as s, sys
for g in (0, 1):
    rs = [json.loads(line) for line in open(f"{sys.argv[1]}/solo_{g}/metrics.jsonl")]
    rs = [x for x in rs if "perf/step_time_s" in x][3:]
    print(f"solo GPU {g}: step {s.median(x['perf/step_time_s'] for x in rs):.4f} s, "
          f"fwd_bwd {s.median(x['time/fwd_bwd_s'] for x in rs):.4f}, opt {s.median(x['time/optimizer_s'] for x in rs):.4f}")
EOF
