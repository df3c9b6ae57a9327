"""World-size-independent sample order.

One permutation of all samples per epoch, drawn from (seed, epoch) alone. Optimizer step k of an epoch
takes permutation positions [k*G, (k+1)*G) (G = global batch; the trailing partial global batch of an
epoch is dropped). Rank r takes the contiguous share [r*M*A, (r+1)*M*A) of those G samples, as A
micro-batches of M (M = micro batch, A = gradient accumulation, G = M*A*world_size). So the union over
ranks of step k's samples is the same set for every world size, and the only position worth persisting
is (seed, epoch, samples_consumed); resuming at another world size that divides G continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class GlobalBatchSampler:
    """A batch sampler (`DataLoader(ds, batch_sampler=...)`) yielding this rank's micro-batches forever.

    Do not let accelerate `prepare` the DataLoader built on it: the sampler already shards by rank.
    `samples_consumed` counts samples of all ranks since the start of training (across epochs); the loop
    adds G per optimizer step and saves it."""

    def __init__(self, num_samples: int, global_batch_size: int, *, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, shuffle: bool = True, samples_consumed: int = 0):
        if micro_batch_size < 1 or world_size < 1 or global_batch_size < 1:
            raise ValueError("micro_batch_size, world_size and global_batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        per_step = micro_batch_size * world_size
        if global_batch_size % per_step:
            raise ValueError(
                f"global batch {global_batch_size} is not micro_batch_size {micro_batch_size} x world_size "
                f"{world_size} x an integer gradient_accumulation_steps"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"{num_samples} training samples are fewer than one global batch of {global_batch_size}: "
                "lower the batch size or add data"
            )
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed must be >= 0, got {samples_consumed}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum = global_batch_size // per_step
        self.shuffle = shuffle
        self.samples_consumed = samples_consumed
        self.steps_per_epoch = num_samples // global_batch_size
        self.samples_per_epoch = self.steps_per_epoch * global_batch_size
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def epoch_of(self, samples_consumed: int) -> int:
        return samples_consumed // self.samples_per_epoch

    def first_step(self, samples_consumed: int) -> int:
        """The global optimizer step (0-based, across epochs) that starts at `samples_consumed`. A
        position inside a step (only after a global-batch change) moves on to the next whole step."""
        epoch, offset = divmod(samples_consumed, self.samples_per_epoch)
        return epoch * self.steps_per_epoch + -(-offset // self.global_batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch])
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def step_indices(self, step: int) -> np.ndarray:
        """The G sample indices of global optimizer step `step` (all ranks together)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = self.global_batch_size
        return self.permutation(epoch)[k * g: (k + 1) * g]

    def rank_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step `step`, in accumulation order."""
        share = self.micro_batch_size * self.grad_accum
        mine = self.step_indices(step)[self.rank * share: (self.rank + 1) * share].tolist()
        m = self.micro_batch_size
        return [mine[i: i + m] for i in range(0, share, m)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.first_step(self.samples_consumed)
        while True:
            yield from self.rank_micro_batches(step)
            step += 1
