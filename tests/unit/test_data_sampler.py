"""Order: one permutation per epoch from (seed, epoch); the k-th optimizer step holds the same sample set
for every world size; resume mid-epoch (at any world size dividing the global batch) skips and repeats
nothing."""

import itertools

import pytest
import torch
from data_fixtures import byte_tokenizer, cfg, write_jsonl

from distsft.data import GlobalBatchSampler, build_datasets, collate

N, G = 50, 12  # 4 steps per epoch, 2 samples dropped per epoch


def step_sets(world_size, steps, micro=1, samples_consumed=0, seed=0, num_samples=N, g=G):
    """For each optimizer step: the union of all ranks' micro-batches (as a sorted list), taking from
    each rank's sampler exactly grad_accum micro-batches per step, as the training loop would."""
    samplers = [GlobalBatchSampler(num_samples, g, seed=seed, rank=r, world_size=world_size, micro_batch_size=micro,
                                   samples_consumed=samples_consumed) for r in range(world_size)]
    accum = samplers[0].grad_accum
    its = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        got = []
        for it in its:
            for mb in itertools.islice(it, accum):
                assert len(mb) == micro
                got += mb
        assert len(got) == g
        out.append(sorted(got))
    return out


def test_same_sample_sets_per_step_for_world_sizes_1_to_4():
    ref = step_sets(1, 10)
    for ws in (2, 3, 4):
        assert step_sets(ws, 10) == ref, ws
    assert step_sets(2, 10, micro=2) == ref and step_sets(3, 10, micro=2) == ref


def test_epoch_is_a_permutation_dropping_the_partial_batch():
    s = GlobalBatchSampler(N, G, seed=0, rank=0, world_size=1, micro_batch_size=1)
    assert s.steps_per_epoch == 4 and s.samples_per_epoch == 48
    for epoch in range(3):
        seen = [i for k in range(4) for i in s.step_indices(epoch * 4 + k).tolist()]
        assert len(seen) == len(set(seen)) == 48  # no repeats inside an epoch
        assert set(seen) <= set(range(N))
    e0 = [i for k in range(4) for i in s.step_indices(k).tolist()]
    e1 = [i for k in range(4, 8) for i in s.step_indices(k).tolist()]
    assert e0 != e1  # a fresh permutation per epoch
    assert s.epoch_of(0) == 0 and s.epoch_of(47) == 0 and s.epoch_of(48) == 1 and s.epoch_of(100) == 2


def test_permutation_depends_only_on_seed_and_epoch():
    a = GlobalBatchSampler(N, G, seed=5, rank=0, world_size=1, micro_batch_size=1)
    b = GlobalBatchSampler(N, G, seed=5, rank=1, world_size=3, micro_batch_size=2)
    c = GlobalBatchSampler(N, G, seed=6, rank=0, world_size=1, micro_batch_size=1)
    assert a.permutation(2).tolist() == b.permutation(2).tolist()
    assert a.permutation(2).tolist() != c.permutation(2).tolist()


def test_no_shuffle_is_in_order():
    s = GlobalBatchSampler(N, G, seed=0, rank=0, world_size=1, micro_batch_size=4, shuffle=False)
    assert next(iter(s)) == [0, 1, 2, 3]


@pytest.mark.parametrize("stop", [1, 3, 4, 6])  # mid-epoch, last step of an epoch, epoch boundary, next epoch
@pytest.mark.parametrize(("ws_before", "ws_after"), [(2, 2), (4, 2), (1, 3), (3, 4)])
def test_resume_loses_and_duplicates_nothing(stop, ws_before, ws_after):
    full = step_sets(1, 12)
    before = step_sets(ws_before, stop)
    after = step_sets(ws_after, 12 - stop, samples_consumed=stop * G)
    assert before + after == full


def test_iter_starts_at_samples_consumed():
    s = GlobalBatchSampler(N, G, seed=1, rank=1, world_size=2, micro_batch_size=3, samples_consumed=5 * G)
    assert s.grad_accum == 2
    first = list(itertools.islice(iter(s), 2))
    assert first == s.rank_micro_batches(5)
    # rank 1's share of step 5 is the second half of that step's G samples
    assert sum(first, []) == s.step_indices(5)[6:].tolist()


def test_invalid_configurations():
    with pytest.raises(ValueError, match="not micro_batch_size 5 x world_size 2"):
        GlobalBatchSampler(N, G, seed=0, rank=0, world_size=2, micro_batch_size=5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, G, seed=0, rank=0, world_size=1, micro_batch_size=1)
    with pytest.raises(ValueError, match="rank 2"):
        GlobalBatchSampler(N, G, seed=0, rank=2, world_size=2, micro_batch_size=1)


def test_with_a_dataloader(tmp_path):
    rows = [{"text": f"document number {i}"} for i in range(30)]
    ds = build_datasets(cfg(write_jsonl(tmp_path / "d.jsonl", rows), packing=False), byte_tokenizer(), seed=0).train
    sampler = GlobalBatchSampler(len(ds), 8, seed=0, rank=0, world_size=2, micro_batch_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler,
                                         collate_fn=lambda b: collate(b, pad_token_id=2))
    batches = list(itertools.islice(iter(loader), 4))
    assert all(b["input_ids"].shape[0] == 2 for b in batches)
    expected = sampler.rank_micro_batches(0) + sampler.rank_micro_batches(1)
    for b, idx in zip(batches, expected, strict=True):
        assert b["input_ids"][0, : len(ds[idx[0]]["input_ids"])].tolist() == ds[idx[0]]["input_ids"].tolist()
