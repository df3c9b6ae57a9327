"""Checkpoint format, atomic commit, verification, discovery and rotation (one process)."""

import json
import logging

import pytest
import torch
from test_loss import make_batch, tiny_lora_model

from distsft.checkpoint import (
    CheckpointError,
    committed_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    rotate,
    save_checkpoint,
    verify,
)
from distsft.config import TrainConfig
from distsft.optim import build_optimizer, build_scheduler


def trained(model_dir, steps=2, seed=0):
    model = tiny_lora_model(model_dir, seed=seed)
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=10)
    for i in range(steps):
        s, n = model(**make_batch([12, 9], model.causal_lm.config.vocab_size, seed=i))
        (s / n).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def save(root, step, model, opt, sched, **state):
    return save_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched,
                           trainer_state={"samples_consumed": 8 * step, **state}, rank=0, world_size=1,
                           barrier=lambda: None)


def test_round_trip_restores_params_moments_and_schedule_exactly(tiny_model_dir, tmp_path):
    model, opt, sched = trained(tiny_model_dir)
    res = save(tmp_path / "ckpt", 2, model, opt, sched)
    assert res.path.name == "step-00000002" and res.bytes > 0

    fresh, opt2, sched2 = trained(tiny_model_dir, steps=0, seed=5)  # other init, empty optimizer
    state = load_checkpoint(res.path, model=fresh, optimizer=opt2, scheduler=sched2)
    assert state["global_step"] == 2 and state["samples_consumed"] == 16
    named = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, named[n]), n
            a, b = opt.state[named[n]], opt2.state[p]
            assert set(a) == set(b) == {"step", "exp_avg", "exp_avg_sq"}
            for k in a:
                assert torch.equal(a[k], b[k]), (n, k)
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_checkpoint_is_adapter_sized(tiny_model_dir, tmp_path):
    model, opt, sched = trained(tiny_model_dir)
    res = save(tmp_path / "ckpt", 2, model, opt, sched)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    shards = sum(f.stat().st_size for f in (res.path / "shards").glob("*.safetensors"))
    print(f"\ncheckpoint {res.bytes} B: shards {shards} B for {trainable} B of adapter (+2 Adam moments); "
          f"frozen base {frozen} B not written")
    assert 3 * trainable <= shards < 3 * trainable + 64 * 1024  # param + exp_avg + exp_avg_sq, small header
    assert res.bytes < frozen  # never the base weights


def test_tampered_shard_is_named(tiny_model_dir, tmp_path):
    model, opt, sched = trained(tiny_model_dir)
    path = save(tmp_path / "ckpt", 2, model, opt, sched).path
    shard = path / "shards" / "rank-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shards/rank-00000.safetensors does not match its SHA-256"):
        verify(path)
    with pytest.raises(CheckpointError, match="rank-00000.safetensors"):
        find_resume_checkpoint(tmp_path, str(path))


def test_auto_resume_takes_newest_valid_and_skips_broken(tiny_model_dir, tmp_path, caplog):
    model, opt, sched = trained(tiny_model_dir)
    root = tmp_path / "out" / "checkpoints"
    for step in (2, 4, 6):
        save(root, step, model, opt, sched)
    (root / "step-00000006" / "trainer_state.json").write_text("{}")  # broken newest
    (root / ".staging-step-00000008").mkdir()  # an uncommitted save
    with caplog.at_level(logging.WARNING):
        found = find_resume_checkpoint(tmp_path / "out", "auto")
    assert found == root / "step-00000004"
    assert "step-00000006" in caplog.text and "skipping broken checkpoint" in caplog.text
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        find_resume_checkpoint(tmp_path / "out", str(root / "step-00000006"))
    with pytest.raises(CheckpointError, match="no such directory"):
        find_resume_checkpoint(tmp_path / "out", str(root / "step-00000099"))
    assert find_resume_checkpoint(tmp_path / "empty", "auto") is None
    assert find_resume_checkpoint(tmp_path / "out", None) is None


def test_crash_before_commit_leaves_previous_checkpoint(tiny_model_dir, tmp_path):
    model, opt, sched = trained(tiny_model_dir)
    root = tmp_path / "checkpoints"
    save(root, 2, model, opt, sched)

    def crash():
        raise KeyboardInterrupt("killed between the shard writes and the commit")

    calls = {"n": 0}

    def barrier():  # the second barrier is the one before the commit
        calls["n"] += 1
        if calls["n"] == 2:
            crash()

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, 4, model=model, optimizer=opt, scheduler=sched, trainer_state={}, rank=0,
                        world_size=1, barrier=barrier)
    assert (root / ".staging-step-00000004").exists()
    assert [p.name for p in committed_checkpoints(root)] == ["step-00000002"]
    assert find_resume_checkpoint(tmp_path, "auto") == root / "step-00000002"
    save(root, 4, model, opt, sched)  # the next save clears the leftover staging directory
    assert not (root / ".staging-step-00000004").exists()


def test_rotation_keeps_newest_and_protects_resume_source(tiny_model_dir, tmp_path):
    model, opt, sched = trained(tiny_model_dir)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save(root, step, model, opt, sched)
    removed = rotate(root, keep=2, protect=root / "step-00000001")
    assert [p.name for p in removed] == ["step-00000002"]
    assert [p.name for p in committed_checkpoints(root)] == ["step-00000001", "step-00000003", "step-00000004"]


def test_manifest_lists_every_file(tiny_model_dir, tmp_path):
    model, opt, sched = trained(tiny_model_dir)
    path = save(tmp_path / "c", 2, model, opt, sched).path
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert manifest["world_size"] == 1 and manifest["step"] == 2 and "torch" in manifest["versions"]


# ----------------------------------------------------------------------------------------------------
# Issue 22: faults found by breaking the trainer as an operator would


def resign(path):
    """Rewrite `path`'s manifest for the files it holds now (what a buggy or foreign writer would leave: a
    checkpoint that verifies, whatever its contents)."""
    import hashlib

    from distsft.checkpoint import _manifest_digest

    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p != mpath):
        data = f.read_bytes()
        manifest["files"][str(f.relative_to(path))] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["digest"] = _manifest_digest(manifest)
    mpath.write_text(json.dumps(manifest))


def test_every_bit_flip_of_the_manifest_is_a_broken_checkpoint(tiny_model_dir, tmp_path, caplog):
    """Regression (issue 22, fault 1): a corrupt manifest crashed `resume_from_checkpoint=auto` instead of
    being skipped. About 18% of single-bit flips of manifest.json gave a UnicodeDecodeError or KeyError that
    escaped `verify()` (it caught only json.JSONDecodeError), and flips that left valid JSON (a step, a
    date, a version) went unnoticed. Every flip of every bit is now a CheckpointError naming the manifest,
    and `auto` falls back to the previous checkpoint with a WARNING."""
    model, opt, sched = trained(tiny_model_dir)
    root = tmp_path / "out" / "checkpoints"
    save(root, 2, model, opt, sched)
    path = save(root, 4, model, opt, sched).path
    mpath = path / "manifest.json"
    original = mpath.read_bytes()
    for bit in range(8 * len(original)):
        data = bytearray(original)
        data[bit // 8] ^= 1 << (bit % 8)
        mpath.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="manifest"):
            verify(path)
        if bit % 89 == 0:  # the whole fallback for a spread of flips (each reads step 2 whole)
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                assert find_resume_checkpoint(tmp_path / "out", "auto") == root / "step-00000002", bit
            assert "skipping broken checkpoint" in caplog.text and "step-00000004" in caplog.text
            with pytest.raises(CheckpointError):
                find_resume_checkpoint(tmp_path / "out", str(path))  # an explicit path stays a hard error
    mpath.write_bytes(original)
    assert find_resume_checkpoint(tmp_path / "out", "auto") == path


def test_only_listed_verified_files_are_loaded(tiny_model_dir, tmp_path, caplog):
    """Regression (issue 22, fault 2): `load_checkpoint` globbed `shards/rank-*.json` instead of reading the
    files the manifest lists. A stray shard pair made `auto` crash ("fragments cover 1024 of 512
    elements"), and a crafted unlisted pair (its index claiming 0 elements) silently overwrote a LoRA
    weight. Unlisted files are now never read, and a checkpoint that verifies but cannot be loaded falls
    back like one that does not verify."""
    import shutil

    from safetensors.torch import save_file

    model, opt, sched = trained(tiny_model_dir)
    root = tmp_path / "out" / "checkpoints"
    save(root, 2, model, opt, sched)
    path = save(root, 4, model, opt, sched).path
    shards = path / "shards"
    saved = dict(model.named_parameters())

    def load_fresh(p):
        fresh, opt2, sched2 = trained(tiny_model_dir, steps=0, seed=5)
        load_checkpoint(p, model=fresh, optimizer=opt2, scheduler=sched2)
        return dict(fresh.named_parameters())

    # A stray copy of rank 0's pair as rank 1's (a leftover of another save, a copy by hand): ignored.
    shutil.copy(shards / "rank-00000.json", shards / "rank-00001.json")
    shutil.copy(shards / "rank-00000.safetensors", shards / "rank-00001.safetensors")
    assert find_resume_checkpoint(tmp_path / "out", "auto") == path
    loaded = load_fresh(path)
    assert all(torch.equal(loaded[n], p) for n, p in saved.items() if p.requires_grad)

    # A crafted unlisted pair: one fragment "of 0 elements" whose tensor is a whole LoRA weight of zeros.
    name = next(n for n, p in saved.items() if p.requires_grad and "lora_B" in n)
    keys = ["exp_avg", "exp_avg_sq", "param"]
    index = [{"name": name, "global_shape": list(saved[name].shape), "offset": 0, "numel": 0, "keys": keys,
              "scalars": {"step": 2.0}}]
    (shards / "rank-00001.json").write_text(json.dumps(index))
    save_file({f"{k}/{name}": torch.zeros(saved[name].numel()) for k in keys}, str(shards / "rank-00001.safetensors"))
    loaded = load_fresh(path)
    assert torch.equal(loaded[name], saved[name]) and saved[name].abs().sum() > 0

    # The same fragment listed (the manifest re-signed over it): it verifies, cannot be loaded, and `auto`
    # falls back to step 2 with a WARNING; an explicit path is a hard error.
    resign(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest_files = set(manifest["files"])
    assert {"shards/rank-00001.json", "shards/rank-00001.safetensors"} <= manifest_files
    verify(path)
    with pytest.raises(CheckpointError, match=r"step-00000004: shards/rank-00001.json: .*index says 0 elements"):
        load_fresh(path)
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path / "out", "auto") == root / "step-00000002"
    assert "skipping broken checkpoint" in caplog.text and "step-00000004" in caplog.text
    with pytest.raises(CheckpointError):
        find_resume_checkpoint(tmp_path / "out", str(path))
    assert find_resume_checkpoint(tmp_path / "out", str(path), read=False) == path  # verify alone: fine

    # Unparsable JSON that verifies (a writer's bug) falls back the same way.
    (shards / "rank-00001.json").write_text("[{")
    resign(path)
    verify(path)
    assert find_resume_checkpoint(tmp_path / "out", "auto") == root / "step-00000002"


def test_newest_is_the_last_committed_not_the_highest_step(tiny_model_dir, tmp_path):
    """Regression (issue 22, fault 3): after a rollback "newest" was the wrong checkpoint. Run A reached
    step 6; run B resumed by explicit path from step 4 and committed step 5; the next `auto` took A's
    abandoned step 6, and that run's rotation deleted B's step 5. Checkpoints are ordered by the commit
    sequence in their manifests; rotation never deletes the live lineage's newest."""
    model, opt, sched = trained(tiny_model_dir)
    out = tmp_path / "out"
    root = out / "checkpoints"
    for step in (2, 4, 6):  # run A
        save(root, step, model, opt, sched)
    b_from = find_resume_checkpoint(out, str(root / "step-00000004"))  # run B, resumed by explicit path
    save(root, 5, model, opt, sched)
    rotate(root, keep=3, protect=b_from)
    assert [p.name for p in committed_checkpoints(root)] == ["step-00000004", "step-00000006", "step-00000005"]

    chosen = find_resume_checkpoint(out, "auto")  # run C continues B's lineage
    assert chosen == root / "step-00000005"
    save(root, 6, model, opt, sched)  # replaces A's abandoned step 6
    removed = rotate(root, keep=2, protect=chosen)
    assert [p.name for p in removed] == ["step-00000004"]
    assert [p.name for p in committed_checkpoints(root)] == ["step-00000005", "step-00000006"]
    assert find_resume_checkpoint(out, "auto") == root / "step-00000006"
    seqs = [json.loads((p / "manifest.json").read_text())["sequence"] for p in committed_checkpoints(root)]
    assert seqs == [4, 5]
    assert not list(root.glob(".trash-*"))  # deleted without leaving anything behind


def test_every_staged_file_is_fsynced_before_the_manifest(tiny_model_dir, tmp_path, monkeypatch):
    """Regression (issue 22): the adapter files and config.yaml in a staging directory were not fsynced
    before the manifest committed them (promise 1 says every file is): a power cut could leave a
    committed checkpoint whose adapter is empty."""
    import os

    from distsft.config import Config
    from distsft.export import save_adapter, trainable_state_dict

    model, opt, sched = trained(tiny_model_dir)
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def extras(staging):
        save_adapter(model.peft_model, trainable_state_dict(model.peft_model), staging / "adapter")
        Config().save(staging / "config.yaml")

    monkeypatch.setattr(os, "fsync", spy)
    res = save_checkpoint(tmp_path / "ckpt", 2, model=model, optimizer=opt, scheduler=sched, trainer_state={},
                          rank=0, world_size=1, barrier=lambda: None, write_extras=extras)
    staging = res.path.with_name(".staging-step-00000002")
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "config.yaml"} <= set(
        manifest["files"])
    committed_at = synced.index(str(staging / "manifest.json"))
    for rel in manifest["files"]:
        assert str(staging / rel) in synced[:committed_at], f"{rel} not fsynced before the manifest"
