"""The resumable training sampler and per-item seeding (data/samplers.py)."""

import itertools

import numpy as np
import torch

from dessam_d2.data.samplers import ResumableTrainingSampler, SeededMapDataset


def test_the_sampler_resumes_its_stream_and_seeds_items_by_position():
    def stream(start_iter, n):
        sampler = ResumableTrainingSampler(5, batch_size_per_rank=2, seed=7)
        sampler.start_iter = start_iter
        return list(itertools.islice(iter(sampler), n))

    whole = stream(0, 40)
    assert stream(3, 34) == whole[6:]  # iteration 3 starts at item 3 x 2
    indices = [index for _, index in whole]
    assert sorted(indices[:5]) == sorted(indices[5:10]) == list(range(5))  # epochs
    assert len({seed for seed, _ in whole}) == 40  # a seed per position, not per image

    flips = SeededMapDataset(list(range(5)), lambda i: (i, np.random.rand(), torch.rand(1)))
    assert str([flips[k] for k in whole[6:12]]) == str([flips[k] for k in stream(3, 6)])
