"""RMSNorm kernel (Llama and Gemma casting) against the reference: output, dx and dw."""

import pytest
import torch
from distsft_kernels import rms_norm, rms_norm_ref
from kernel_tolerances import check_against_reference

SHAPES = [(4, 64), (3, 41, 123), (2, 7, 4, 128)]  # power of two; odd; Qwen3 q_norm over head_dim
VARIANTS = [("llama", 0.0), ("gemma", 1.0)]


def _inputs(shape, device):
    x = torch.randn(shape, device=device) * 2 + 0.5
    w = torch.randn(shape[-1], device=device) * 0.1 + 1.0
    return [x, w]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("casting,offset", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, casting, offset, dtype, device):
    x, w = _inputs(shape, device)
    if casting == "gemma":
        w = w - 1.0  # Gemma stores w with y = xhat * (1 + w)
    check_against_reference(
        f"rms_norm[{casting}]",
        lambda x, w: rms_norm(x, w, 1e-6, offset=offset, casting=casting),
        lambda x, w: rms_norm_ref(x, w, 1e-6, offset=offset, casting=casting),
        [x, w], dtype,
    )


@pytest.mark.parametrize("casting,offset", VARIANTS)
def test_rms_norm_dw_over_several_row_blocks_per_program(casting, offset, device):
    """More row blocks than programs, with a ragged last block: the backward's next-block prefetch and the
    per-program dw accumulated over blocks (397 rows: 13 programs of 2 blocks of 16 rows, the last one 13
    rows, under the interpreter)."""
    x, w = _inputs((397, 96), device)
    if casting == "gemma":
        w = w - 1.0
    check_against_reference(
        f"rms_norm[{casting}, many rows]",
        lambda x, w: rms_norm(x, w, 1e-6, offset=offset, casting=casting),
        lambda x, w: rms_norm_ref(x, w, 1e-6, offset=offset, casting=casting),
        [x, w], torch.bfloat16,
    )


@pytest.mark.parametrize("casting,offset", VARIANTS)
def test_frozen_weight_gets_no_gradient(casting, offset, device):
    x, w = _inputs((5, 123), device)
    xk = x.clone().requires_grad_()
    y = rms_norm(xk, w, 1e-5, offset=offset, casting=casting)  # w does not require grad (LoRA)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xr = x.clone().requires_grad_()
    (rms_norm_ref(xr, w, 1e-5, offset=offset, casting=casting) * g).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_mixed_precision_output_dtype_follows_hf(device):
    """Llama: fp32 weight times bf16 normalised row -> fp32 (HF's promotion); Gemma: the input dtype."""
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(64, device=device)
    assert rms_norm(x, w).dtype == rms_norm_ref(x, w).dtype == torch.float32
    assert rms_norm(x, w, offset=1.0, casting="gemma").dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_llama3_8b_shape(dtype, cuda):
    x, w = _inputs((16384, 4096), cuda)
    check_against_reference("rms_norm[8B]", lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_ref(x, w, 1e-5),
                            [x, w], dtype)


@pytest.mark.gpu
def test_launches_after_the_first_call_the_compiled_kernel_directly(cuda, monkeypatch):
    """Later calls with the same specialization skip Triton's launch path (distsft_kernels/_common.py `Launcher`):
    only the first of three goes through `kernel[grid]`, and every one computes the reference's values,
    on fresh inputs each time."""
    import importlib

    C = importlib.import_module("distsft_kernels._common")
    R = importlib.import_module("distsft_kernels.rms_norm")  # the package's `rms_norm` is the function
    regular = []

    class Counting:  # the kernel as the Launcher sees it, counting Triton-path launches
        arg_names = R._rms_norm_fwd_kernel.arg_names

        def __getitem__(self, grid):
            regular.append(grid)
            return R._rms_norm_fwd_kernel[grid]

    monkeypatch.setattr(R, "_launch_fwd", C.Launcher(Counting()))
    for _ in range(3):
        x = torch.randn(64, 4096, device=cuda, dtype=torch.bfloat16)
        w = torch.randn(4096, device=cuda, dtype=torch.bfloat16)
        torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), rtol=0.016, atol=0.016)
    assert C._direct_ok is True
    assert len(regular) == 1, f"{len(regular)} of 3 launches took Triton's path"
    assert C._c_ok is True, "the compiled kernels' C launcher is not called directly with this Triton"


@pytest.mark.gpu
def test_direct_launches_still_call_a_registered_launch_hook(cuda, monkeypatch):
    """A Triton launch hook (its profiler's) registered after a kernel's first launch still sees every
    later launch: the direct C-launcher path hands those to the compiled kernel's own runner."""
    import importlib

    knobs = pytest.importorskip("triton.knobs")
    C = importlib.import_module("distsft_kernels._common")
    R = importlib.import_module("distsft_kernels.rms_norm")
    if not hasattr(knobs.runtime.launch_enter_hook, "add"):
        pytest.skip("this Triton's launch hooks are not hook chains")
    monkeypatch.setattr(R, "_launch_fwd", C.Launcher(R._rms_norm_fwd_kernel))
    x = torch.randn(64, 4096, device=cuda, dtype=torch.bfloat16)
    w = torch.randn(4096, device=cuda, dtype=torch.bfloat16)
    rms_norm(x, w, 1e-5)  # the first launch: compiled, the direct path recorded
    seen = []

    def hook(metadata):
        seen.append(metadata.get()["name"] if hasattr(metadata, "get") else metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        y = rms_norm(x, w, 1e-5)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    rms_norm(x, w, 1e-5)
    assert len(seen) == 1 and "rms_norm" in str(seen[0]), seen
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-5), rtol=0.016, atol=0.016)


def test_direct_c_launch_is_gated_by_flag_and_triton_release(monkeypatch):
    """Triton's internal C launcher is called only with `DIRECT_C_LAUNCH` on and on a Triton release of
    `DIRECT_C_LAUNCH_TRITON`; otherwise `_c_launcher` declines before touching the compiled kernel, and
    launches go through `compiled[grid](...)`. (CPU: only the gate; the launch itself is `-m gpu`.)"""
    import distsft_kernels._common as C

    current = C._triton_release()
    monkeypatch.setattr(C, "DIRECT_C_LAUNCH_TRITON", ((0, 0), (0, 1)))
    assert C._c_launcher(object(), ()) is None  # a release it was not checked on
    monkeypatch.setattr(C, "DIRECT_C_LAUNCH_TRITON", (current, (current[0], current[1] + 1)))
    monkeypatch.setattr(C, "DIRECT_C_LAUNCH", False)
    assert C._c_launcher(object(), ()) is None  # switched off
