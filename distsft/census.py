"""What ran: the kernel census, and the per-call backend choice every patched forward makes.

    with record_kernels() as census:                  # the trainer's first optimizer step
        loss = model(batch); loss.backward()
    logger.info("%s", census.summary(report))        # report: distsft.patching.PatchReport
    report_census(census, report, tracker, step, backend, is_main)   # the trainer's: every rank, one event

What was patched is not what runs. While `record_kernels()` is open, each bound forward (distsft/patching.py,
the fused LoRA projections in distsft/fused_lora.py, the 4-bit dequantization in distsft/qlora.py, the
loss in distsft/loss.py) notes, per module, which path it took: our Triton kernel or the PyTorch
reference, fused LoRA or peft's forward, our dequantization or bitsandbytes', the loss kind.
`KernelCensus.summary` / `as_dict` report that against the patch report, naming the reason of every
layer that fell back.

A room of its own, below everything that notes into it: patching, fused_lora, qlora and loss all import
it, and it imports none of them (the patch report and the per-module spec are read by attribute).

Backend, decided per call from the tensor's device (`use_triton`): `auto` runs Triton where it can (CUDA
tensors, or CPU tensors when the kernels were loaded under TRITON_INTERPRET=1) and the PyTorch references
of `distsft_kernels.reference` elsewhere; `triton` raises where Triton cannot run; `torch` always uses
the references (which reproduce the HF modules' numerics).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict

import distsft_kernels as K
import torch

logger = logging.getLogger("distsft")

TAG = "_distsft_kernel"
"""The attribute a patched module instance carries its spec under (distsft.patching's `_Spec`: backend,
name, ...): set by patching, read by the bound forwards, the fused LoRA path and the census."""


class KernelCensus:
    """Which path each patched module took while recording: {kernel: {path: {module names}}}, plus the
    reason of every LoRA layer that ran peft's forward and the fused groups (projection names joined by
    '+'). Paths: "triton" (our kernel), "torch" (the PyTorch reference), "fused" / "peft" (LoRA),
    "bitsandbytes" (4-bit dequantization by bitsandbytes), "fused_linear_ce" / "ce" / "reference" (loss)."""

    def __init__(self):
        self.ran: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.fallbacks: dict[str, str] = {}  # LoRA layer -> why it ran peft's forward
        self.groups: Counter = Counter()  # "q_proj+k_proj+v_proj" -> fused calls
        self.why_reference: str | None = None  # why a Triton kernel ran its PyTorch reference

    def note(self, kernel: str, path: str, name: str) -> None:
        self.ran[kernel][path].add(name)

    def counts(self) -> dict[str, dict[str, int]]:
        return {k: {p: len(names) for p, names in paths.items()} for k, paths in sorted(self.ran.items())}

    def ours(self, kernel: str) -> int:
        """Modules that ran distsft's path for `kernel` (Triton kernel, fused LoRA, our dequantization)."""
        paths = self.ran.get(kernel, {})
        return len(paths.get("fused" if kernel == "lora" else "triton", ()))

    def missing(self, report) -> dict[str, int]:
        """Patched kernels that ran our path on fewer modules than were patched (`report.counts`, a
        distsft.patching.PatchReport): {kernel: shortfall}."""
        return {k: n - self.ours(k) for k, n in report.counts.items() if n and self.ours(k) < n}

    def as_dict(self, report=None) -> dict:
        out = {"ran": self.counts(), "fused_groups": dict(self.groups),
               "fallbacks": dict(sorted(self.fallbacks.items()))}
        if report is not None:
            out["patched"] = dict(report.counts)
            out["missing"] = self.missing(report)
        return out

    def summary(self, report) -> str:
        """One line: per patched kernel, how many modules ran our path out of those patched, and how."""
        parts = []
        for kernel, n in report.counts.items():
            if not n:
                continue
            paths = self.ran.get(kernel, {})
            how = ", ".join(f"{p} {len(v)}" for p, v in sorted(paths.items())) or "never called"
            parts.append(f"{kernel} {self.ours(kernel)}/{n} ({how})")
        for kernel in ("dequantize_4bit", "loss"):
            if kernel in self.ran:
                parts.append(f"{kernel}: " + ", ".join(f"{p} {len(v)}" for p, v in sorted(self.ran[kernel].items())))
        if self.groups:
            parts.append("fused groups: " + ", ".join(f"{g} x{n}" for g, n in sorted(self.groups.items())))
        return "; ".join(parts) or "no patched module ran"

    def fallback_warnings(self) -> list[str]:
        """One message per reason, naming every layer that fell back for it."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        for name, why in sorted(self.fallbacks.items()):
            by_reason[why].append(name)
        msgs = [f"kernels.lora: {len(names)} LoRA layer(s) ran peft's forward, not the fused projections, "
                f"because {why}: {', '.join(names)}" for why, names in by_reason.items()]
        if self.why_reference:
            ref = sorted(k for k, paths in self.ran.items() if "torch" in paths)
            if ref:
                msgs.append(f"kernels: {', '.join(ref)} ran the PyTorch reference, not Triton: {self.why_reference}")
        return msgs


ACTIVE: KernelCensus | None = None
"""The census `record_kernels` holds open in this process, else None (read by the hot paths as
`census.ACTIVE`: one attribute load when nothing records)."""


@contextlib.contextmanager
def record_kernels():
    """Count what the patched forwards run inside the block (nested blocks share the outer census)."""
    global ACTIVE
    if ACTIVE is not None:
        yield ACTIVE
        return
    ACTIVE = KernelCensus()
    try:
        yield ACTIVE
    finally:
        census, ACTIVE = ACTIVE, None
        del census


def note(kernel: str, path: str, name: str) -> None:
    if ACTIVE is not None:
        ACTIVE.note(kernel, path, name)


def note_backend(kernel: str, spec, triton: bool, t: torch.Tensor) -> None:
    """`spec`: the module's spec (`.backend`, `.name`)."""
    if ACTIVE is not None:
        ACTIVE.note(kernel, "triton" if triton else "torch", spec.name)
        if not triton and ACTIVE.why_reference is None:
            ACTIVE.why_reference = (
                "kernels.backend=torch" if spec.backend == "torch" else "Triton is not installed"
                if not K.HAS_TRITON else f"the tensors are on {t.device}, and Triton runs on CUDA or, on the "
                "CPU, only when TRITON_INTERPRET=1 is set before distsft_kernels is imported")


def use_triton(backend: str, t: torch.Tensor) -> bool:
    """Whether this call runs our Triton kernel (see the module docstring)."""
    if backend == "torch":
        return False
    ok = K.HAS_TRITON and K.triton_can_run(t)
    if backend == "triton" and not ok:
        why = "Triton is not installed" if not K.HAS_TRITON else (
            f"the tensors are on {t.device} and the kernels were loaded "
            + ("under TRITON_INTERPRET=1 (CPU only)" if K.INTERPRETED else "for the GPU (set TRITON_INTERPRET=1 "
               "before importing distsft_kernels to run them on CPU)"))
        raise RuntimeError(f"kernels.backend=triton but Triton cannot run here: {why}; use kernels.backend=auto")
    return ok


def report_census(census: KernelCensus, report, tracker, step: int, backend: str, is_main: bool) -> None:
    """After the trainer's first step: which path every patched module ran, as the `kernels` event and one
    log line, and a warning per reason for everything that did not run our kernel, from the main process
    for every rank (a collective: the census of each rank is gathered). `tracker`: distsft.tracking.Tracker."""
    from accelerate.utils import gather_object

    mine = census.as_dict(report)
    ranks = gather_object([mine])
    short = {rank: r["missing"] for rank, r in enumerate(ranks) if r["missing"]}
    tracker.event("kernels", step, **mine, ranks_short=short or None)
    if not is_main:
        return
    logger.info("kernels run in step %d: %s", step + 1, census.summary(report))
    for msg in census.fallback_warnings():
        (logger.info if backend == "torch" else logger.warning)("%s", msg)
    differ = {rank: r["ran"] for rank, r in enumerate(ranks) if r["ran"] != mine["ran"]}
    if differ:
        logger.warning("kernels: other ranks ran other paths in step %d than rank 0 (%s): %s", step + 1,
                       mine["ran"], differ)
