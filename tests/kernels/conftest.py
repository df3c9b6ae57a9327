"""Kernel tests: Triton's CPU interpreter where there is no GPU; real CUDA otherwise (and `-m gpu`).

`TRITON_INTERPRET=1` only takes effect for kernels decorated after it is set, i.e. before the first
`import distsft_kernels` in this process; if another test module imported it earlier without the
variable, the kernel tests here cannot interpret and we stop with a clear message.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import distsft_kernels  # noqa: E402

if not torch.cuda.is_available() and distsft_kernels.HAS_TRITON and not distsft_kernels.INTERPRETED:
    raise pytest.UsageError(
        "distsft_kernels was imported before TRITON_INTERPRET=1 was set (by an earlier test module); "
        "set it in tests/conftest.py when no CUDA is present, or run tests/kernels on its own"
    )

from kernel_tolerances import DEVICE  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible: the seed is a hash of the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
