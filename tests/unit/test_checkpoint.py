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
