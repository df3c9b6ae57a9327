"""Resumable checkpoints: adapter-sized, atomic, verified, and independent of the world size.

Layout, one directory per optimizer step under `<output_dir>/checkpoints/`:

    step-00000100/
      shards/rank-00000.safetensors   this rank's fragments of every trainable tensor and optimizer tensor
      shards/rank-00000.json          index: name -> global shape, flat offset, numel, dtype, scalar state
      trainer_state.json              counters, data position, scheduler, param-group hyper-parameters,
                                      RNG policy, tracker run id, world size, global batch, versions
      config.yaml                     the resolved run config
      adapter/                        the PEFT adapter (loads with PeftModel.from_pretrained)
      manifest.json                   written last: every file with size and SHA-256, step, world size,
                                      commit sequence, and a digest of the manifest itself
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
barrier one committer fsyncs every staged file (the adapter and config.yaml too), writes the manifest,
renames staging to its final name and fsyncs the parent. A crash at any moment leaves the previous
checkpoint intact and the new one either committed or ignored.

Order and discovery: "newest" is the last *committed*, by the manifest's commit sequence (one more than any
checkpoint in the directory at commit time), never the highest step: after a rollback the step a resumed
run committed last wins over a higher step of the abandoned run. Any manifest that cannot be read, is
malformed or does not match its own digest makes a broken checkpoint (skipped by `auto` with a WARNING).

Loading reads only safetensors and JSON, only the files the manifest lists, and parses the very bytes that
matched their SHA-256; every index entry is checked against its tensors and the fragments must tile each
tensor exactly. `find_resume_checkpoint` reads a candidate the way `load_checkpoint` will, so one that
verifies but cannot be loaded falls back like one that does not verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distsft.lifecycle import injected_fault

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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def _unwrap_optimizer(optimizer):
    """accelerate's wrapper -> the optimizer it wraps (a torch optimizer, or DeepSpeed's ZeRO optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (under ZeRO, the one stepping the flat fp32 partitions)."""
    opt = _unwrap_optimizer(optimizer)
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _mode(params: list[torch.nn.Parameter]) -> str:
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(hasattr(p, "_hp_mapping") for p in params):
        return "zero12"
    return "replicated"


def _state_entry(state: dict, flat: torch.Tensor, start: int, numel: int) -> tuple[dict, dict]:
    """Split one flat partition's optimizer state into this fragment's tensors and the scalars."""
    tensors, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == flat.shape:
            tensors[key] = value.detach().narrow(0, start, numel)
        elif not torch.is_tensor(value) or value.ndim == 0:
            scalars[key] = float(value)
    return tensors, scalars


def local_fragments(model: torch.nn.Module, optimizer, *, rank: int) -> list[Fragment]:
    """The fragments this rank owns, read where each mode keeps them:

    - replicated (one process, DDP): every rank holds everything; rank 0 writes whole tensors.
    - ZeRO-1/2: DeepSpeed's per-parameter fragment mapping (`param._hp_mapping`) names the slice of the
      flattened parameter that lives in this rank's fp32 partition, and where in that partition.
    - ZeRO-3: each parameter is split in equal contiguous partitions (the last one padded); this rank's
      is `rank * partition_size`, read through DeepSpeed's local fp32/optimizer-state accessors.
    Parameter values are the fp32 master weights wherever ZeRO keeps them.
    """
    named = trainable_named_parameters(model)
    mode = _mode([p for _, p in named])
    torch_opt = _torch_optimizer(optimizer)
    frags = []
    if mode == "replicated":
        if rank != 0:
            return []
        for name, p in named:
            flat = p.detach().reshape(-1)
            tensors, scalars = _state_entry(
                {k: (v.reshape(-1) if torch.is_tensor(v) and v.ndim > 0 else v)
                 for k, v in torch_opt.state.get(p, {}).items()}, flat, 0, flat.numel())
            frags.append(Fragment(name, tuple(p.shape), 0, {"param": flat, **tensors}, scalars))
    elif mode == "zero12":
        zopt = _unwrap_optimizer(optimizer)
        for name, p in named:
            m = p._hp_mapping
            if m is None:  # no part of this parameter in this rank's partition
                continue
            flat = zopt.single_partition_of_fp32_groups[m.param_group_index]
            hp, lp = m.hp_fragment_address, m.lp_fragment_address
            tensors, scalars = _state_entry(torch_opt.state.get(flat, {}), flat, hp.start, hp.numel)
            frags.append(Fragment(name, tuple(p.shape), lp.start,
                                  {"param": m.hp_fragment.detach().reshape(-1), **tensors}, scalars))
    else:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        keys, scalars = _zero3_state_keys(optimizer)
        for name, p in named:
            size = p.ds_tensor.ds_numel
            offset = rank * size
            real = max(0, min(size, p.ds_numel - offset))  # the last partition is padded
            tensors = {"param": safe_get_local_fp32_param(p).detach().reshape(-1)[:real].cpu()}
            for key in keys:
                tensors[key] = safe_get_local_optimizer_state(p, key).detach().reshape(-1)[:real].cpu()
            if real:
                frags.append(Fragment(name, tuple(p.ds_shape), offset, tensors, dict(scalars)))
    return frags


def _zero3_state_keys(optimizer) -> tuple[list[str], dict[str, float]]:
    zopt = _unwrap_optimizer(optimizer)
    state = _torch_optimizer(optimizer).state
    for flat in zopt.fp32_partitioned_groups_flat:
        if flat in state:
            tensors, scalars = _state_entry(state[flat], flat, 0, flat.numel())
            return sorted(tensors), scalars
    return [], {}


def assemble(fragments: list[dict]) -> dict[str, dict[str, Any]]:
    """Fragments from any number of ranks -> whole tensors by name. Every fragment must be what its index
    says (each tensor 1-D with `numel` elements, inside the global tensor, the same keys and global
    shape as the other fragments of its name), and the fragments of a name must tile it exactly: no
    gap, no overlap. Anything else is a CheckpointError naming the tensor (a crafted fragment whose
    index claimed 0 elements overwrote a LoRA weight unnoticed)."""
    whole: dict[str, dict[str, Any]] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    for frag in fragments:
        name, shape, offset, numel = frag["name"], tuple(frag["global_shape"]), frag["offset"], frag["numel"]
        total = math.prod(shape)
        where = f"{frag['source']}: {name}" if "source" in frag else name
        entry = whole.setdefault(name, {"shape": shape, "tensors": {}, "scalars": dict(frag["scalars"]),
                                        "keys": set(frag["tensors"])})
        if entry["shape"] != shape:
            raise CheckpointError(f"{where}: fragments disagree on the global shape ({entry['shape']} vs {shape})")
        if set(frag["tensors"]) != entry["keys"] or "param" not in entry["keys"]:
            raise CheckpointError(f"{where}: fragments hold different state ({sorted(frag['tensors'])} vs "
                                  f"{sorted(entry['keys'])})")
        if not 0 <= offset <= offset + numel <= total:
            raise CheckpointError(f"{where}: fragment [{offset}, {offset + numel}) outside its {total} elements")
        for key, t in frag["tensors"].items():
            if t.dim() != 1 or t.numel() != numel:
                raise CheckpointError(f"{where}: {key} fragment has shape {tuple(t.shape)}, its index says {numel} "
                                      "elements")
            buf = entry["tensors"].get(key)
            if buf is None:
                buf = entry["tensors"][key] = torch.empty(total, dtype=t.dtype)
            buf[offset: offset + numel] = t
        spans.setdefault(name, []).append((offset, offset + numel))
    for name, entry in whole.items():
        end = 0
        for start, stop in sorted(spans[name]):
            if start != end:
                raise CheckpointError(f"{name}: fragments {'overlap' if start < end else 'leave a gap'} at "
                                      f"element {min(start, end)} of {math.prod(entry['shape'])}")
            end = stop
        if end != math.prod(entry["shape"]):
            raise CheckpointError(f"{name}: fragments cover {end} of {math.prod(entry['shape'])} elements")
        del entry["keys"]
        entry["tensors"] = {k: v.view(entry["shape"]) for k, v in entry["tensors"].items()}
    return whole


def apply_whole_state(model: torch.nn.Module, optimizer, whole: dict[str, dict], param_groups: list[dict]) -> None:
    """Give this rank its part of the whole tensors: parameters, optimizer state, group hyper-parameters.
    Works for any saved world size and any current mode (replicated, ZeRO-1/2, ZeRO-3)."""
    params = dict(trainable_named_parameters(model))
    missing = sorted(set(params) - set(whole))
    unexpected = sorted(set(whole) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the model's trainable parameters: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, p in params.items():
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        if tuple(whole[name]["shape"]) != shape:
            raise CheckpointError(f"{name}: shape {tuple(whole[name]['shape'])} in checkpoint, {shape} in model")
    mode = _mode(list(params.values()))
    with torch.no_grad():
        if mode == "replicated":
            _apply_replicated(params, optimizer, whole, param_groups)
        elif mode == "zero12":
            _apply_zero12(params, optimizer, whole)
        else:
            _apply_zero3(params, optimizer, whole)
    if mode != "replicated":
        for group, saved in zip(_torch_optimizer(optimizer).param_groups, param_groups, strict=False):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v
                          for k, v in saved.items() if k in group and k != "params"})


def _new_state(flat: torch.Tensor, keys: list[str], scalars: dict[str, float], group: dict) -> dict:
    """Optimizer state for a flat partition that has never stepped (DeepSpeed creates it lazily)."""
    on_device = group.get("fused") or group.get("capturable")
    st = {k: torch.zeros_like(flat) for k in keys}
    for k, v in scalars.items():
        st[k] = torch.tensor(v, dtype=torch.float32, device=flat.device if on_device else "cpu")
    return st


def _apply_replicated(params, optimizer, whole, param_groups) -> None:
    opt = _torch_optimizer(optimizer)
    for name, p in params.items():
        p.copy_(whole[name]["tensors"]["param"])
    # Rebuild a torch optimizer state_dict in the current optimizer's parameter order, then let torch
    # place each value (it moves "step" to the device for fused/capturable AdamW, and casts moments).
    index, state, groups = 0, {}, []
    name_of = {id(p): n for n, p in params.items()}
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


def _apply_zero12(params, optimizer, whole) -> None:
    zopt, torch_opt = _unwrap_optimizer(optimizer), _torch_optimizer(optimizer)
    for name, p in params.items():
        entry = whole[name]
        full = {k: v.reshape(-1) for k, v in entry["tensors"].items()}
        p.data.copy_(full["param"].view(p.shape).to(p.dtype))  # ZeRO-1/2 keep whole low-precision replicas
        m = p._hp_mapping
        if m is None:
            continue
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        m.hp_fragment.data.copy_(full["param"][lp.start: lp.start + lp.numel])
        flat = zopt.single_partition_of_fp32_groups[m.param_group_index]
        keys = [k for k in full if k != "param"]
        if keys and flat not in torch_opt.state:
            torch_opt.state[flat] = _new_state(flat, keys, entry["scalars"],
                                               torch_opt.param_groups[m.param_group_index])
        st = torch_opt.state.get(flat, {})
        for k in keys:
            st[k].narrow(0, hp.start, hp.numel).copy_(full[k][lp.start: lp.start + lp.numel])
        for k, v in entry["scalars"].items():
            st[k] = torch.full_like(st[k], v) if torch.is_tensor(st.get(k)) else v


def _zero3_partition(whole: torch.Tensor, size: int, offset: int, device) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a whole tensor: `size` elements from `offset`, zero-padded."""
    flat = whole.reshape(-1)
    out = torch.zeros(size, dtype=torch.float32)
    real = max(0, min(size, flat.numel() - offset))
    out[:real] = flat[offset: offset + real]
    return out.to(device)


def _apply_zero3(params, optimizer, whole) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    zopt, torch_opt = _unwrap_optimizer(optimizer), _torch_optimizer(optimizer)
    rank = dist.get_rank()
    any_entry = next(iter(whole.values()))
    keys = [k for k in any_entry["tensors"] if k != "param"]
    if keys:  # every flat partition needs a state before DeepSpeed's accessors can write into it
        for i, flat in enumerate(zopt.fp32_partitioned_groups_flat):
            if flat not in torch_opt.state:
                group = torch_opt.param_groups[min(i, len(torch_opt.param_groups) - 1)]
                torch_opt.state[flat] = _new_state(flat, keys, any_entry["scalars"], group)
    for name, p in params.items():
        size = p.ds_tensor.ds_numel
        offset = rank * size
        value = _zero3_partition(whole[name]["tensors"]["param"], size, offset, p.ds_tensor.device)
        safe_set_local_fp32_param(p, value)
        p.ds_tensor.data.copy_(value.to(p.ds_tensor.dtype))
        if p.ds_status == ZeroParamStatus.AVAILABLE:  # gathered now (the persistent LoRA tensors): the
            p.data.copy_(whole[name]["tensors"]["param"].to(p.dtype))  # whole copy too, not only the partition
        for k in keys:
            safe_set_local_optimizer_state(p, _zero3_partition(whole[name]["tensors"][k], size, offset,
                                                               p.ds_tensor.device), k)
    for flat in zopt.fp32_partitioned_groups_flat:
        st = torch_opt.state.get(flat, {})
        for k, v in any_entry["scalars"].items():
            st[k] = torch.full_like(st[k], v) if torch.is_tensor(st.get(k)) else v


def _group_hparams(optimizer) -> list[dict]:
    out = []
    for g in _torch_optimizer(optimizer).param_groups:
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
        for trash in root.glob(".trash-step-*"):  # a deletion that crashed (see _remove_dir)
            shutil.rmtree(trash, ignore_errors=True)
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
        if injected_fault("kill_in_save", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dying between its write and the commit
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
            "sequence": _next_sequence(root),
            "world_size": world_size,
            "config_hash": config_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            "files": {
                str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files
            },
        }
        manifest["digest"] = _manifest_digest(manifest)
        for f in files:  # every file, whoever wrote it (the adapter and config.yaml too), before the manifest
            _fsync_file(f)
        for d in {p.parent for p in files}:
            _fsync_dir(d)
        _write_json(staging / MANIFEST, manifest)
        _fsync_dir(staging)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            _remove_dir(final)
        os.replace(staging, final)
        _fsync_dir(root)
        size = sum(v["bytes"] for v in manifest["files"].values())
        result = SaveResult(final, time.perf_counter() - t0, size)
        logger.info("checkpoint %s committed: %.1f MB in %.2fs", final, size / 1e6, result.seconds)
    barrier()  # nobody reads or rotates before the commit is visible
    return result


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory without ever showing a half-deleted one under its committed name:
    rename it out of discovery's sight first (a crash mid-delete leaves a `.trash-*` directory)."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("distsft", "torch", "transformers", "peft", "accelerate", "deepspeed"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ----------------------------------------------------------------------------------------------------
# Manifests, verification, discovery, rotation

# What a manifest holds. Older manifests (before `sequence` and `digest`) lack those two and still load.
_MANIFEST_KEYS = {"format_version", "step", "sequence", "world_size", "config_hash", "created", "versions",
                  "files", "digest"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD_INDEX = re.compile(r"^shards/rank-(\d{5})\.json$")


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's own content (every key but `digest`, canonical JSON): a change anywhere in
    it, even one that leaves valid JSON with valid values (a step, a sequence number), is detected."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint directory `path`, checked for shape and self-consistency (not yet the
    files it lists): any unreadable, malformed or altered manifest is a CheckpointError naming it."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete or foreign directory)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{mpath}: unreadable ({type(e).__name__}: {e})") from None

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{mpath}: malformed manifest ({what})")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    unknown = sorted(set(manifest) - _MANIFEST_KEYS)
    missing = sorted({"step", "world_size", "files"} - set(manifest))
    if unknown or missing:
        raise bad(f"unknown keys {unknown}" if unknown else f"missing {missing}")
    if "digest" in manifest and manifest["digest"] != _manifest_digest(manifest):
        raise CheckpointError(f"{mpath}: does not match its own digest (corrupt or edited)")
    if not (_is_int(manifest["step"]) and manifest["step"] >= 0):
        raise bad(f"step {manifest['step']!r}")
    if not (_is_int(manifest["world_size"]) and manifest["world_size"] >= 1):
        raise bad(f"world_size {manifest['world_size']!r}")
    if "sequence" in manifest and not (_is_int(manifest["sequence"]) and manifest["sequence"] >= 1):
        raise bad(f"sequence {manifest['sequence']!r}")
    if STEP_DIR.match(path.name) and int(path.name[5:]) != manifest["step"]:
        raise CheckpointError(f"{mpath}: says step {manifest['step']}, the directory is {path.name}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise bad("no file list")
    for rel, meta in files.items():
        parts = Path(rel).parts
        if (not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel or rel == MANIFEST
                or str(Path(*parts)) != rel):
            raise bad(f"file name {rel!r}")
        if not (isinstance(meta, dict) and set(meta) == {"bytes", "sha256"} and _is_int(meta["bytes"])
                and meta["bytes"] >= 0 and isinstance(meta["sha256"], str) and _SHA256.match(meta["sha256"])):
            raise bad(f"entry of {rel}: {meta!r}")
    return manifest


def _listed_file(path: Path, rel: str) -> Path:
    f = path / rel
    if not f.is_file():
        raise CheckpointError(f"{path}: missing file {rel}")
    if not f.resolve().is_relative_to(path.resolve()):
        raise CheckpointError(f"{path}: {rel} leads outside the checkpoint directory")
    return f


def _check_file(path: Path, rel: str, meta: dict) -> None:
    f = _listed_file(path, rel)
    if f.stat().st_size != meta["bytes"]:
        raise CheckpointError(f"{path}: {rel} has {f.stat().st_size} bytes, manifest says {meta['bytes']}")
    try:
        digest = _sha256(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {rel} ({e})") from None
    if digest != meta["sha256"]:
        raise CheckpointError(f"{path}: {rel} does not match its SHA-256 in the manifest (corrupt or tampered)")


def _read_checked(path: Path, rel: str, meta: dict) -> bytes:
    """The bytes of a listed file, checked against the manifest as read: what is parsed is what verified."""
    try:
        data = _listed_file(path, rel).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {rel} ({e})") from None
    if len(data) != meta["bytes"]:
        raise CheckpointError(f"{path}: {rel} has {len(data)} bytes, manifest says {meta['bytes']}")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{path}: {rel} does not match its SHA-256 in the manifest (corrupt or tampered)")
    return data


def verify(path: Path) -> dict:
    """Return the manifest if it is well-formed and every file it lists exists with its size and SHA-256;
    else CheckpointError."""
    manifest = read_manifest(path)
    for rel, meta in manifest["files"].items():
        _check_file(path, rel, meta)
    return manifest


@dataclass
class CheckpointContents:
    """What `read_checkpoint` read: the manifest, the trainer state, and the whole trainable tensors."""

    path: Path
    manifest: dict
    state: dict[str, Any]
    whole: dict[str, dict[str, Any]]


def read_checkpoint(path: Path) -> CheckpointContents:
    """Verify a checkpoint and read it, loading only files its manifest lists, from the very bytes that
    matched their SHA-256: the shard pairs (`shards/rank-NNNNN.json` + `.safetensors`) and
    `trainer_state.json`; the other listed files are verified. Everything is checked as it is parsed
    (index entries, tensor names, sizes and dtypes, coverage of every tensor), so a checkpoint that
    verifies but cannot be loaded is a CheckpointError here, before anything is applied to the model."""
    manifest = read_manifest(path)
    files = manifest["files"]
    indices = sorted(rel for rel in files if _SHARD_INDEX.match(rel))
    shards = {rel[: -len(".json")] + ".safetensors" for rel in indices}
    loaded = {"trainer_state.json", *indices, *shards}
    for rel in sorted(shards | {"trainer_state.json"}):
        if rel not in files:
            raise CheckpointError(f"{path}: {MANIFEST} lists no {rel}")
    if not indices:
        raise CheckpointError(f"{path}: {MANIFEST} lists no shard")
    for rel in sorted(files):
        if rel not in loaded:
            _check_file(path, rel, files[rel])
    fragments = []
    for rel in indices:
        fragments += _read_shard(path, rel, files)
    try:
        state = json.loads(_read_checked(path, "trainer_state.json", files["trainer_state.json"]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: trainer_state.json is not valid JSON ({e})") from None
    if not (isinstance(state, dict) and state.get("global_step") == manifest["step"]
            and state.get("world_size") == manifest["world_size"] and isinstance(state.get("param_groups"), list)):
        raise CheckpointError(f"{path}: trainer_state.json does not describe step {manifest['step']} on "
                              f"{manifest['world_size']} process(es) (global_step, world_size, param_groups)")
    try:
        whole = assemble(fragments)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return CheckpointContents(path, manifest, state, whole)


def _read_shard(path: Path, index_rel: str, files: dict) -> list[dict]:
    """One rank's fragments: its index (JSON) and tensors (safetensors), each checked against the other."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    shard_rel = index_rel[: -len(".json")] + ".safetensors"
    try:
        index = json.loads(_read_checked(path, index_rel, files[index_rel]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: {index_rel} is not valid JSON ({e})") from None
    try:
        tensors = load_safetensors(_read_checked(path, shard_rel, files[shard_rel]))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: {shard_rel} is not a safetensors file ({e})") from None
    if not isinstance(index, list):
        raise CheckpointError(f"{path}: {index_rel} is not a list of fragments")
    fragments, used = [], set()
    for n, entry in enumerate(index):
        where = f"{path}: {index_rel} entry {n}"
        if not (isinstance(entry, dict) and {"name", "global_shape", "offset", "numel", "keys", "scalars"}
                <= set(entry) and isinstance(entry["name"], str) and isinstance(entry["global_shape"], list)
                and all(_is_int(d) and d >= 0 for d in entry["global_shape"]) and _is_int(entry["offset"])
                and _is_int(entry["numel"]) and isinstance(entry["keys"], list)
                and all(isinstance(k, str) for k in entry["keys"]) and isinstance(entry["scalars"], dict)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        for v in entry["scalars"].values())):
            raise CheckpointError(f"{where}: malformed")
        names = [f"{k}/{entry['name']}" for k in entry["keys"]]
        absent = [k for k in names if k not in tensors]
        if absent:
            raise CheckpointError(f"{where}: {shard_rel} has no tensor {absent[0]}")
        if not all(tensors[k].is_floating_point() for k in names):
            raise CheckpointError(f"{where}: a tensor of {entry['name']} is not floating point")
        used.update(names)
        fragments.append({"name": entry["name"], "global_shape": entry["global_shape"], "offset": entry["offset"],
                          "numel": entry["numel"], "scalars": entry["scalars"], "source": index_rel,
                          "tensors": {k: tensors[f"{k}/{entry['name']}"] for k in entry["keys"]}})
    if set(tensors) != used:
        raise CheckpointError(f"{path}: {shard_rel} holds tensors its index does not list "
                              f"({sorted(set(tensors) - used)[:3]})")
    return fragments


def _surveyed(root: Path) -> list[tuple[Path, dict | CheckpointError]]:
    """Committed step directories under `root` with their manifest (or why it cannot be read), oldest
    first *in commit order*: by the commit sequence in the manifest (each commit takes one more than any
    checkpoint in the directory), then by step. Not by step alone: after a rollback (a run resumed from
    step 4 of a run that reached step 6) the step 5 committed last is the newest, not the abandoned step 6.
    Manifests without a sequence (older checkpoints) come before those with one; unreadable or altered
    ones first of all (never "newest": a flipped bit in a sequence number fails the manifest's digest).
    Staging directories never count."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and STEP_DIR.match(p.name):
            try:
                found.append((p, read_manifest(p)))
            except CheckpointError as e:
                found.append((p, e))

    def order(entry) -> tuple[int, int, int]:
        p, m = entry
        step = int(STEP_DIR.match(p.name).group(1))
        if isinstance(m, CheckpointError):
            return (0, 0, step)
        return (2, m["sequence"], step) if "sequence" in m else (1, 0, step)

    return sorted(found, key=order)


def committed_checkpoints(root: Path) -> list[Path]:
    """Committed step directories under `root`, oldest first in commit order (see `_surveyed`)."""
    return [p for p, _ in _surveyed(root)]


def _next_sequence(root: Path) -> int:
    return 1 + max((m.get("sequence", 0) for _, m in _surveyed(root) if isinstance(m, dict)), default=0)


def find_resume_checkpoint(output_dir: str | os.PathLike, spec: str | None, *, read: bool = True) -> Path | None:
    """`None`: start fresh. `auto`: the newest checkpoint (commit order) that verifies and reads; a broken
    one, whatever is wrong with it (its manifest, a file, the contents), is skipped with a WARNING naming
    it. A path: it must exist and verify and read. `read=False` only verifies (the cheap check before the
    run starts); the default reads every loaded file as `load_checkpoint` will, so that a checkpoint that
    verifies but cannot be loaded falls back like one that does not verify."""
    if spec is None:
        return None
    check = read_checkpoint if read else verify
    if spec != "auto":
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume_from_checkpoint: no such directory {path}")
        check(path)
        return path
    root = Path(output_dir) / "checkpoints"
    surveyed = _surveyed(root)
    for _, problem in surveyed:
        if isinstance(problem, CheckpointError):
            logger.warning("skipping broken checkpoint: %s", problem)
    for path, manifest in reversed(surveyed):
        if isinstance(manifest, CheckpointError):
            continue
        try:
            check(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping broken checkpoint: %s", e)
    logger.info("no committed checkpoint under %s: starting fresh", root)
    return None


def rotate(root: Path, keep: int, protect: Path | list[Path | None] | None = None) -> list[Path]:
    """Delete the oldest committed checkpoints (commit order) beyond `keep`, never one in `protect` (the
    one resumed from). Call after a commit: the checkpoint just committed is the newest, so it is kept."""
    ckpts = committed_checkpoints(root)
    protected = {Path(p).resolve() for p in (protect if isinstance(protect, list) else [protect]) if p is not None}
    doomed = [p for p in ckpts[: max(0, len(ckpts) - keep)] if p.resolve() not in protected]
    for p in doomed:
        _remove_dir(p)
    return doomed


# ----------------------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Verify and read (`read_checkpoint`), then restore the trainable state, optimizer and scheduler;
    return the trainer state. A checkpoint of another model (other trainable names or shapes) is a
    CheckpointError too, raised before anything is changed."""
    contents = read_checkpoint(path)
    state = contents.state
    apply_whole_state(model, optimizer, contents.whole, state["param_groups"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def resume(output_dir: Path, spec: str | None, *, model: torch.nn.Module, optimizer, scheduler, global_batch: int,
           allow_global_batch_change: bool, is_main: bool) -> tuple[dict[str, Any], Path | None, float | None]:
    """The checkpoint a run continues (`checkpoint.resume_from_checkpoint` = `spec`), loaded into `model`,
    `optimizer` and `scheduler`: (trainer state, its path, seconds it took); a fresh state, None, None
    without one. Rank 0 chooses (and verifies) the checkpoint; every rank then loads that one, whatever its
    view of a shared filesystem says (a collective: if rank 0 fails here, torchrun ends the others at once).
    A checkpoint of another global batch is refused unless `allow_global_batch_change`."""
    from accelerate.utils import broadcast_object_list

    state = {"global_step": 0, "samples_consumed": 0, "tokens_consumed": 0, "skipped_steps": 0}
    path = broadcast_object_list([find_resume_checkpoint(output_dir, spec) if is_main else None])[0]
    if path is None:
        return state, None, None
    started = time.perf_counter()
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    load_s = time.perf_counter() - started
    if state["global_batch_size"] != global_batch and not allow_global_batch_change:
        raise ValueError(
            f"{path} was trained with a global batch of {state['global_batch_size']}, this run has "
            f"{global_batch}: each step would see other samples. Keep per_device_train_batch_size x "
            "gradient_accumulation_steps x processes constant, or set distributed.allow_global_batch_change=true"
        )
    logger.info("resumed from %s at step %d (%d samples consumed)", path, state["global_step"],
                state["samples_consumed"])
    return state, path, load_s
