"""The multi-GPU benchmark behind launch/bench_multigpu.py (its command line and phase list), in three parts:

    reporting.py   what a call records: provenance, the markdown tables, FILE.md and FILE.json, `report`
    launching.py   how it runs the trainer: torchrun launches, their processes and logs, models, overrides
    throughput.py  phases 1-2 (weak scaling, ZeRO-3 at the big shape)
    losses.py      phases 3-5 (loss parity, the resume chain, two agents on one host), sharing their runs
    sigterm.py     phase 6 (SIGTERM during an N-GPU run)

Imports run one way: reporting <- launching <- the phases <- bench_multigpu.py.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ("scaling", "zero3", "parity", "resume", "nodes", "sigterm")
# NVLink multicast can take a shared host's GPUs out of service: off in every process we start.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
