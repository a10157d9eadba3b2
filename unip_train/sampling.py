"""Data order and augmentation randomness that do not depend on RNG history: how both trainers
resume exactly, and why their loader workers never restart.

An epoch's order is a permutation drawn from (seed, epoch); each sample's augmentation draws from
a generator seeded by (seed, epoch, sample index). Neither depends on how many batches a process
has produced, on loader workers, or on the global RNG, so a resumed run starts mid-epoch by
skipping positions and sees the very samples and crops the uninterrupted run saw.

The loaders of both trainers (:func:`keyed_loader`) take their batches from :class:`KeyBatches`:
lists of ``(epoch, index)`` keys, epoch after epoch. The epoch travels with each key to the
worker, so no worker needs to be told that an epoch began: one loader iterator serves the whole
run, its workers start once, and ``persistent_workers`` keeps them if the loader is iterated again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

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

    def indices(self, epoch: int | None = None) -> list[int]:
        """This process's share of epoch ``epoch``'s permutation (default: the epoch set last)."""
        epoch = self.epoch if epoch is None else epoch
        perm = torch.randperm(self.n, generator=keyed_generator(self.seed, epoch)).tolist()
        total = self.per_rank * self.world_size
        perm = (perm * -(-total // self.n))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


Key = tuple[int, int]  # (epoch, sample index)


class KeyBatches(torch.utils.data.Sampler[list[Key]]):
    """A batch sampler: this process's batches of ``(epoch, index)`` keys, epoch after epoch.

    Batch ``b`` of the stream (counted from the start of training) is batch ``b mod per_epoch`` of
    epoch ``b // per_epoch``; an epoch is ``per_epoch`` batches of ``batch_size`` positions of
    :meth:`EpochSampler.indices` (default: as many whole batches as the share holds; the rest is
    dropped). :meth:`set_range` chooses the batches an iteration yields, so a resumed run starts
    at the batch its checkpoint names.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, per_epoch: int | None = None):
        self.sampler, self.batch_size = sampler, batch_size
        self.per_epoch = per_epoch if per_epoch is not None else sampler.per_rank // batch_size
        if not 0 < self.per_epoch * batch_size <= sampler.per_rank:
            raise ValueError(
                f"{self.per_epoch} batches of {batch_size} do not fit in {sampler.per_rank} samples per epoch"
            )
        self.first, self.stop = 0, None

    def set_range(self, first: int, stop: int | None = None) -> None:
        """Iterate batches ``first .. stop - 1`` of the stream (without end when ``stop`` is None)."""
        self.first, self.stop = first, stop

    def __iter__(self) -> Iterator[list[Key]]:
        stop = math.inf if self.stop is None else self.stop
        b, epoch, order = self.first, None, []
        while b < stop:
            e, pos = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.sampler.indices(e)
            start = pos * self.batch_size
            yield [(epoch, i) for i in order[start : start + self.batch_size]]
            b += 1

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an open-ended KeyBatches stream has no length")
        return max(0, self.stop - self.first)


class KeyedDataset(torch.utils.data.Dataset):
    """A dataset whose sample ``index`` in ``epoch`` is a function of the two (its augmentation
    draws from :func:`sample_generator`). Indexed by ``(epoch, index)`` keys, as :class:`KeyBatches`
    hands them to loader workers, or by a plain index for the epoch :meth:`set_epoch` chose
    (direct use: notebooks, tests). Subclasses implement :meth:`item`."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item(self, index: int, epoch: int):
        """Sample ``index`` as drawn in ``epoch``."""
        raise NotImplementedError

    def __getitem__(self, key: int | Key):
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self.item(index, epoch)


def keyed_loader(
    dataset: KeyedDataset,
    batches: KeyBatches,
    num_workers: int,
    pin_memory: bool = False,
    collate_fn: Callable | None = None,
) -> torch.utils.data.DataLoader:
    """The training loader of both trainers: ``batches`` of keys, ``num_workers`` processes kept for
    the whole run. Its own generator keeps iterator creation off the global RNG (exact resume)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),
    )
