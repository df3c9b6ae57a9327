"""Under `torch.no_grad()` (a checkpointed layer's first forward) the kernels skip their autograd node and
launch directly: the same values, bitwise, and nothing recorded."""

import importlib

import torch
from distsft_kernels import gated_activation, lora_projections, rms_norm, rope

_FUNCTIONS = [("rms_norm", "RMSNormFunction"), ("swiglu", "GLUFunction"), ("rope", "RopeFunction"),
              ("lora", "_LoRAProjections")]


def _both(fn, monkeypatch):
    torch.manual_seed(0)
    with_grad = fn(True)
    torch.manual_seed(0)
    with monkeypatch.context() as m, torch.no_grad():
        for module, name in _FUNCTIONS:  # the no_grad path must not go through the autograd Function
            cls = getattr(importlib.import_module(f"distsft_kernels.{module}"), name)
            m.setattr(cls, "apply", classmethod(lambda *a, name=name: (_ for _ in ()).throw(
                AssertionError(f"{name}.apply called under no_grad"))))
        without = fn(False)
    return with_grad, without


def test_no_grad_paths_skip_the_node_and_compute_the_same_values(device, monkeypatch):
    g = torch.Generator(device=device).manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=g)

    x, w = rnd(4, 6, 32), rnd(32)
    gate, up = rnd(5, 48), rnd(5, 48)
    q, k, cos, sin = rnd(2, 4, 6, 16), rnd(2, 2, 6, 16), rnd(1, 6, 16), rnd(1, 6, 16)
    a, b, ws = [rnd(4, 32), rnd(4, 32)], [rnd(40, 4), rnd(40, 4)], [rnd(40, 32), rnd(40, 32)]
    cases = {
        "rms_norm": lambda grad: rms_norm(x.clone().requires_grad_(grad), w, 1e-6),
        "swiglu": lambda grad: gated_activation(gate.clone().requires_grad_(grad), up.clone()),
        "rope": lambda grad: torch.cat([t.flatten() for t in rope((q * 1).requires_grad_(grad) * 1, k * 1, cos, sin)]),
        "lora": lambda grad: torch.cat([t.flatten() for t in lora_projections(
            x.clone().requires_grad_(grad), a, b, [2.0, 2.0], weights=ws)]),
        "lora 4-bit-like": lambda grad: torch.cat([t.flatten() for t in lora_projections(
            x.clone().requires_grad_(grad), a, b, [2.0, 2.0],
            weights=[lambda out=None, w=w_: w if out is None else out.copy_(w) for w_ in ws])]),
    }
    for name, fn in cases.items():
        with_grad, without = _both(fn, monkeypatch)
        assert with_grad.grad_fn is not None, name
        assert without.grad_fn is None and not without.requires_grad, name
        assert torch.equal(with_grad.detach(), without), name
