"""Data order and augmentation randomness that do not depend on RNG history: how both trainers
resume exactly.

An epoch's order is a permutation drawn from (seed, epoch); each sample's augmentation draws from
a generator seeded by (seed, epoch, sample index). Neither depends on how many batches a process
has produced, on loader workers, or on the global RNG, so a resumed run starts mid-epoch by
skipping positions and sees the very samples and crops the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def keyed_generator(*keys: int) -> torch.Generator:
    """A torch generator whose stream depends on ``keys`` only (mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator one sample's augmentation draws from in one epoch."""
    return keyed_generator(seed, epoch, index)


class EpochSampler(torch.utils.data.Sampler[int]):
    """This process's share of the epoch's permutation (DistributedSampler-like).

    The permutation comes from (seed, epoch); it is padded by wrapping to a multiple of
    ``world_size`` and dealt round-robin. ``set_epoch(epoch, start)`` skips the first ``start``
    positions of this process's share: how a resumed run continues mid-epoch.
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.world_size, self.rank, self.seed = n, world_size, rank, seed
        self.per_rank = -(-n // world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        perm = torch.randperm(self.n, generator=keyed_generator(self.seed, self.epoch)).tolist()
        total = self.per_rank * self.world_size
        perm = (perm * -(-total // self.n))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
