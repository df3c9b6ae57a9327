"""Resumable checkpoints: adapter-sized, atomic, verified, and independent of the world size.

Layout, one directory per optimizer step under `<output_dir>/checkpoints/`:

    step-00000100/
      shards/rank-00000.safetensors   this rank's fragments of every trainable tensor and optimizer tensor
      shards/rank-00000.json          index: name -> global shape, flat offset, numel, dtype, scalar state
      trainer_state.json              counters, data position, scheduler, param-group hyper-parameters,
                                      RNG policy, tracker run id, world size, global batch, versions
      config.yaml                     the resolved run config
      adapter/                        the PEFT adapter (loads with PeftModel.from_pretrained)
      manifest.json                   written last: every file with size and SHA-256, step, world size
    .staging-step-00000100/           while being written; never discovered, removed by the next save

Why our own layout rather than torch.distributed.checkpoint or DeepSpeed's files: the state is
adapter-sized (megabytes), and the one hard requirement is that any world size and any ZeRO stage can
read it with no conversion step. So every rank writes the flat fragments it owns, keyed by parameter
*name* with their offset into the flattened global tensor (a ZeRO-1/2/3 rank owns a contiguous slice of
each flattened fp32 master weight and Adam moment; with DDP or one process rank 0 owns whole tensors),
and a reader assembles whole tensors from all fragments, then gives each new rank what it owns. Nothing
is gathered to one rank at save time, the frozen base weights are never written, and DeepSpeed's own
checkpoint (which fixes the world size into its file names and partitions) is not used at all.

Atomicity (RELIABILITY.md promises 1, 2, 5): ranks write into the staging directory and fsync; after a
barrier one committer writes the manifest, renames staging to its final name and fsyncs the parent. A
crash at any moment leaves the previous checkpoint intact and the new one either committed or ignored.
Loading reads only safetensors and JSON, after the manifest has verified every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not verify."""


# ----------------------------------------------------------------------------------------------------
# Files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    _fsync_file(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------------
# Trainable state <-> name-keyed fragments


@dataclass
class Fragment:
    """A contiguous slice [offset, offset + numel) of one flattened global tensor, with its optimizer state."""

    name: str
    global_shape: tuple[int, ...]
    offset: int
    tensors: dict[str, torch.Tensor]  # "param", "exp_avg", ... each 1-D, numel elements
    scalars: dict[str, float]  # e.g. Adam's "step"


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def local_fragments(model: torch.nn.Module, optimizer, *, rank: int) -> list[Fragment]:
    """Fragments this rank owns. Single process and DDP: rank 0 owns every tensor whole (all ranks hold
    identical copies, so one writer suffices)."""
    if rank != 0:
        return []
    opt = _unwrap_optimizer(optimizer)
    state = opt.state
    frags = []
    for name, p in trainable_named_parameters(model):
        tensors = {"param": p.detach().reshape(-1)}
        scalars = {}
        for key, value in state.get(p, {}).items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[key] = value.detach().reshape(-1)
            else:
                scalars[key] = float(value)
        frags.append(Fragment(name, tuple(p.shape), 0, tensors, scalars))
    return frags


def assemble(fragments: list[dict]) -> dict[str, dict[str, Any]]:
    """Fragments from any number of ranks -> whole tensors by name, checking coverage exactly."""
    whole: dict[str, dict[str, Any]] = {}
    covered: dict[str, int] = {}
    for frag in fragments:
        name, shape = frag["name"], tuple(frag["global_shape"])
        numel = 1
        for s in shape:
            numel *= s
        entry = whole.setdefault(name, {"shape": shape, "tensors": {}, "scalars": dict(frag["scalars"])})
        if entry["shape"] != shape:
            raise CheckpointError(f"{name}: fragments disagree on the global shape ({entry['shape']} vs {shape})")
        for key, t in frag["tensors"].items():
            buf = entry["tensors"].get(key)
            if buf is None:
                buf = entry["tensors"][key] = torch.empty(numel, dtype=t.dtype)
            buf[frag["offset"] : frag["offset"] + t.numel()] = t
        covered[name] = covered.get(name, 0) + frag["numel"]
    for name, entry in whole.items():
        numel = 1
        for s in entry["shape"]:
            numel *= s
        if covered[name] != numel:
            raise CheckpointError(f"{name}: fragments cover {covered[name]} of {numel} elements")
        entry["tensors"] = {k: v.view(entry["shape"]) for k, v in entry["tensors"].items()}
    return whole


def apply_whole_state(model: torch.nn.Module, optimizer, whole: dict[str, dict], param_groups: list[dict]) -> None:
    """Load whole tensors into this rank's model parameters and optimizer (single process / DDP)."""
    params = dict(trainable_named_parameters(model))
    missing = sorted(set(params) - set(whole))
    unexpected = sorted(set(whole) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    opt = _unwrap_optimizer(optimizer)
    with torch.no_grad():
        for name, p in params.items():
            src = whole[name]["tensors"]["param"]
            if tuple(src.shape) != tuple(p.shape):
                raise CheckpointError(f"{name}: shape {tuple(src.shape)} in checkpoint, {tuple(p.shape)} in model")
            p.copy_(src)
    # Rebuild a torch optimizer state_dict in the current optimizer's parameter order, then let torch
    # place each value (it moves "step" to the device for fused/capturable AdamW, and casts moments).
    index, state = 0, {}
    name_of = {id(p): n for n, p in params.items()}
    groups = []
    for g_idx, group in enumerate(opt.param_groups):
        ids = []
        for p in group["params"]:
            entry = whole[name_of[id(p)]]
            st = {k: v for k, v in entry["tensors"].items() if k != "param"}
            for k, v in entry["scalars"].items():
                st[k] = torch.tensor(v, dtype=torch.float32)
            if st:
                state[index] = st
            ids.append(index)
            index += 1
        saved = param_groups[g_idx] if g_idx < len(param_groups) else {}
        # JSON turned tuples (Adam's betas) into lists; give them back the current group's type.
        saved = {k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()}
        groups.append({**{k: v for k, v in group.items() if k != "params"}, **saved, "params": ids})
    opt.load_state_dict({"state": state, "param_groups": groups})


def _group_hparams(optimizer) -> list[dict]:
    out = []
    for g in _unwrap_optimizer(optimizer).param_groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"})
    return out


# ----------------------------------------------------------------------------------------------------
# Save


@dataclass
class SaveResult:
    path: Path
    seconds: float
    bytes: int


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    write_extras: Callable[[Path], None] | None = None,
    config_hash: str = "",
) -> SaveResult | None:
    """Write and commit `step-XXXXXXXX` under `root`. Every rank calls this; rank 0 commits.

    `write_extras(staging_dir)` runs on rank 0 before the commit (the adapter and config go there).
    Returns the result on rank 0, None elsewhere.
    """
    t0 = time.perf_counter()
    root = Path(root)
    final = root / step_dir_name(step)
    staging = root / f".staging-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # a save that crashed before its commit
        (staging / "shards").mkdir(parents=True)
    barrier()

    frags = local_fragments(model, optimizer, rank=rank)
    if frags:
        tensors, index = {}, []
        for f in frags:
            for key, t in f.tensors.items():
                tensors[f"{key}/{f.name}"] = t.contiguous().cpu()
            index.append(
                {
                    "name": f.name,
                    "global_shape": list(f.global_shape),
                    "offset": f.offset,
                    "numel": int(f.tensors["param"].numel()),
                    "keys": sorted(f.tensors),
                    "scalars": f.scalars,
                }
            )
        shard = staging / "shards" / f"rank-{rank:05d}.safetensors"
        save_file(tensors, str(shard))
        _fsync_file(shard)
        _write_json(staging / "shards" / f"rank-{rank:05d}.json", index)

    if rank == 0:
        state = dict(trainer_state)
        state.update(
            format_version=FORMAT_VERSION,
            global_step=step,
            world_size=world_size,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            param_groups=_group_hparams(optimizer),
            versions=_versions(),
        )
        _write_json(staging / "trainer_state.json", state)
        if write_extras is not None:
            write_extras(staging)
    barrier()  # every shard is on disk and fsynced

    result = None
    if rank == 0:
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "config_hash": config_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "files": {
                str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files
            },
        }
        for d in {p.parent for p in files}:
            _fsync_dir(d)
        _write_json(staging / MANIFEST, manifest)
        _fsync_dir(staging)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
        size = sum(v["bytes"] for v in manifest["files"].values())
        result = SaveResult(final, time.perf_counter() - t0, size)
        logger.info("checkpoint %s committed: %.1f MB in %.2fs", final, size / 1e6, result.seconds)
    barrier()  # nobody reads or rotates before the commit is visible
    return result


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("distsft", "torch", "transformers", "peft", "accelerate", "deepspeed"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ----------------------------------------------------------------------------------------------------
# Discovery, verification, rotation


def verify(path: Path) -> dict:
    """Return the manifest if every file it lists exists with its size and SHA-256; else CheckpointError."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete or foreign directory)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: missing file {rel}")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {rel} has {f.stat().st_size} bytes, manifest says {meta['bytes']}")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {rel} does not match its SHA-256 in the manifest (corrupt or tampered)")
    return manifest


def committed_checkpoints(root: Path) -> list[Path]:
    """Committed step directories under `root`, oldest first (staging directories never count)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_resume_checkpoint(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """`None`: start fresh. `auto`: newest checkpoint that verifies (broken ones skipped with a warning).
    A path: it must exist and verify."""
    if spec is None:
        return None
    if spec != "auto":
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume_from_checkpoint: no such directory {path}")
        verify(path)
        return path
    root = Path(output_dir) / "checkpoints"
    for path in reversed(committed_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping broken checkpoint: %s", e)
    logger.info("no committed checkpoint under %s: starting fresh", root)
    return None


def rotate(root: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest committed checkpoints beyond `keep` (never `protect`). Call after a commit."""
    ckpts = committed_checkpoints(root)
    doomed = [p for p in ckpts[: max(0, len(ckpts) - keep)] if protect is None or p.resolve() != protect.resolve()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Verify, then restore the trainable state, optimizer and scheduler; return the trainer state."""
    verify(path)
    fragments = []
    for idx_file in sorted((path / "shards").glob("rank-*.json")):
        tensors = load_file(str(idx_file.with_suffix(".safetensors")))
        for entry in json.loads(idx_file.read_text()):
            fragments.append(
                {
                    "name": entry["name"],
                    "global_shape": entry["global_shape"],
                    "offset": entry["offset"],
                    "numel": entry["numel"],
                    "scalars": entry["scalars"],
                    "tensors": {k: tensors[f"{k}/{entry['name']}"] for k in entry["keys"]},
                }
            )
    state = json.loads((path / "trainer_state.json").read_text())
    apply_whole_state(model, optimizer, assemble(fragments), state["param_groups"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
