"""The Feistel order: a bijection of range(n) with the statistics of a random permutation,
computed at the positions read (issue 28, part 3). Properties only, never the formula."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from torchrepro.data import DataLoader
from torchrepro.data._sampler import Order


def _perm(n: int, epoch: int, seed: int = 0) -> list[int]:
    order = Order(length=n, batch_size=1, drop_last=False, shuffle=True, seed=seed)
    return list(order.indices(epoch, 0))


SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 97, 127, 128, 129, 1000, 1021]
SIZES += [1023, 1024, 1025, 4093, 65535, 65536, 65537]


@pytest.mark.parametrize("n", SIZES)
def test_every_epoch_is_a_permutation(n: int) -> None:
    for epoch, seed in itertools.product(range(3), (0, 2**64 - 1)):
        assert sorted(_perm(n, epoch, seed)) == list(range(n))


def test_every_order_of_tiny_n_is_reached_about_equally_often() -> None:
    for n, keys in ((3, 1200), (4, 4800)):
        counts = Counter(tuple(_perm(n, epoch)) for epoch in range(keys))
        orders = math.factorial(n)
        assert len(counts) == orders
        expected = keys / orders  # 200
        chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
        assert chi2 < 3 * (orders - 1) + 15  # dof 5 or 23; p < 1e-4 at these bounds


def test_positions_fixed_points_and_adjacent_pairs_match_a_random_permutation() -> None:
    n, keys = 64, 1500
    sums = torch.zeros(n)
    fixed = adjacent = 0
    for epoch in range(keys):
        p = torch.tensor(_perm(n, epoch))
        sums += p
        fixed += int((p == torch.arange(n)).sum())
        adjacent += int((p[1:] == p[:-1] + 1).sum())
    # Each position's mean is (n - 1) / 2: sd of one draw ~18.5, of the mean ~0.48.
    assert (sums / keys - (n - 1) / 2).abs().max() < 2.5
    # Fixed points and ascending neighbours: ~Poisson(1) and (n - 1) / n per permutation.
    assert abs(fixed / keys - 1) < 0.15
    assert abs(adjacent / keys - (n - 1) / n) < 0.15


def test_epochs_and_seeds_draw_different_orders() -> None:
    orders = {tuple(_perm(1000, e, s)) for e in range(5) for s in range(5)}
    assert len(orders) == 25


def test_first_batch_and_resume_at_any_size_without_the_whole_permutation() -> None:
    # 10**12 samples: a randperm would need 8 TB. The rank split still holds.
    n = 10**12
    ranks = [
        Order(length=n, batch_size=4, drop_last=False, shuffle=True, seed=1, world_size=2, rank=r)
        for r in range(2)
    ]
    whole = Order(length=n, batch_size=8, drop_last=False, shuffle=True, seed=1)
    at = 9 * n // 80  # global batch at 90% of the epoch
    first = list(itertools.islice(whole.indices(3, at), 8))
    split = [list(itertools.islice(r.indices(3, at), 4)) for r in ranks]
    assert split[0] + split[1] == first
    assert len(set(first)) == 8 and all(0 <= i < n for i in first)


def test_a_new_loader_uses_the_feistel_order_and_says_so() -> None:
    loader = DataLoader(list(range(10)), batch_size=5, shuffle=True, seed=0)
    assert loader.state_dict()["permutation"] == "feistel"
    rows = torch.cat(list(loader)).tolist()
    assert rows == _perm(10, 0)
