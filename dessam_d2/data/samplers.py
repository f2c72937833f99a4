"""A training stream that a resumed run continues exactly where the interrupted one stopped.

Detectron2's ``TrainingSampler`` restarts its stream when training resumes, so a resumed run sees
other images (and other augmentations) than the uninterrupted one would have. Here:
    * ``ResumableTrainingSampler`` is the same infinite, seeded stream, started at the first image
      of iteration ``start_iter`` (set by the trainer after loading the checkpoint), and yields
      ``(item_seed, index)`` with ``item_seed`` a function of (seed, position in the stream) only;
    * ``SeededMapDataset`` seeds the RNGs from ``item_seed`` before mapping an item, so random
      augmentations of the n-th image do not depend on which worker maps it, nor on a resume.
Batch i of a rank is then items [i * B, (i + 1) * B) of that rank's share of the stream, provided
batches are cut in order (no aspect-ratio grouping: SAM pads every image to the same square, so
grouping would save no padding anyway).
"""

import itertools
import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from detectron2.data.common import MapDataset
from detectron2.data.samplers import TrainingSampler
from detectron2.utils.env import seed_all_rng

__all__ = ["ResumableTrainingSampler", "SeededMapDataset", "derived_seed"]


def derived_seed(*entropy: int) -> int:
    """A well-mixed 31-bit seed from a tuple of non-negative integers (seed, rank, step, ...)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]) & 0x7FFFFFFF


class ResumableTrainingSampler(TrainingSampler):
    """``TrainingSampler`` that starts at iteration ``start_iter`` and yields (item seed, index)."""

    def __init__(
        self,
        size: int,
        batch_size_per_rank: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
    ):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.batch_size_per_rank = int(batch_size_per_rank)
        self.start_iter = 0  # set before the data loader's iterator is created

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        first = self.start_iter * self.batch_size_per_rank * self._world_size + self._rank
        positions = itertools.count(first, self._world_size)
        indices = itertools.islice(self._infinite_indices(), first, None, self._world_size)
        for position, index in zip(positions, indices):
            yield derived_seed(self._seed, position), index


class SeededMapDataset(MapDataset):
    """``MapDataset`` indexed by (item seed, index): the mapper runs with python/numpy/torch
    seeded from the item seed, and the caller's RNG states are restored afterwards (with
    ``NUM_WORKERS`` 0 the caller is the training step, whose draws must not depend on it)."""

    def __getitem__(self, key: Tuple[int, int]):
        item_seed, index = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_all_rng(item_seed)
            try:
                return super().__getitem__(index)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
