"""Shared test setup: CPU-friendly environment and tiny-model helpers (no downloads anywhere)."""

import os

# Before torch/triton/wandb are imported by any test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. when distsft_kernels is first imported, which
    # any test module may trigger: set it here, before collection, not in tests/kernels only.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _support import write_tiny_llama  # noqa: E402


@pytest.fixture
def tiny_model_dir(tmp_path):
    return write_tiny_llama(tmp_path / "tiny-model")
