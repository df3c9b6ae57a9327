"""Shared test setup: CPU-friendly environment and tiny-model helpers (no downloads anywhere)."""

import os
import time
from pathlib import Path

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


def pytest_collection_modifyitems(session, config, items):
    """DeepSpeed on CPU compiles a shared-memory communication op the first time a process group starts
    (about a minute on 2 cores, several when busy), inside whichever training subprocess comes first, with
    its output captured: the run looks hung. When integration tests are selected and the op is not cached
    yet, build it here, once, saying so."""
    if torch.cuda.is_available() or not any(item.get_closest_marker("integration") for item in items):
        return
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops import __compatible_ops__ as compatible
    except ImportError:
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not compatible.get(builder.NAME, False):
        return
    from torch.utils.cpp_extension import _get_build_directory

    if (Path(_get_build_directory(builder.NAME, verbose=False)) / f"{builder.NAME}.so").is_file():
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter else print
    say(f"building DeepSpeed's CPU op {builder.NAME} once for the multi-process tests (a minute or more; "
        "cached under ~/.cache/torch_extensions)...")
    t0 = time.monotonic()
    builder.load(verbose=False)
    say(f"built {builder.NAME} in {time.monotonic() - t0:.0f} s")
