#!/usr/bin/env bash
# Multi-node (or single-node) LoRA SFT. Run the same command on every node, changing NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.cluster MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     bash launch/multinode.sh --config run.yaml distributed.deepspeed_config=ds_configs/zero2.json
#
# Arguments are passed to `distsft train` (torchrun's agent underneath, one per node). train.output_dir must be
# on a filesystem every node sees (checkpoints are written by every rank and committed by rank 0). The exit
# code is the trainer's: 0 finished; 2 bad configuration or input (one line on stderr); 75 preempted
# (SIGTERM/SIGUSR1) after a committed checkpoint: run again with checkpoint.resume_from_checkpoint=auto;
# 65 diverged (non-finite losses): do not retry; anything else: a crash.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
: "${MASTER_PORT:=29500}" "${GPUS_PER_NODE:=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
repo=$(cd "$(dirname "$0")/.." && pwd)
exec python3 "$repo/distsft/__main__.py" train --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$GPUS_PER_NODE" "$@"
