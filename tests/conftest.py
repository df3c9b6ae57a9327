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

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_TOKENIZER = "builtin:tiny-llama"


def write_tiny_llama(directory: Path, **overrides) -> Path:
    """A 2-layer Llama config (GQA, vocab of the demo tokenizer) as `directory/config.json`."""
    base = json.loads((REPO / "distsft" / "assets" / "tiny-llama" / "config.json").read_text())
    base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
    base.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(base))
    return directory


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-model")
