"""When a pass binds its epoch, and when the order advances (issues 24 and 28)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from torchrepro.data import DataLoader

N, BATCH = 12, 3


class Noisy(Dataset[torch.Tensor]):
    """A sample is its index and a draw of torch's global RNG (per-sample seeded)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.cat([torch.tensor([float(i)]), torch.rand(2)])


def _pass(loader: DataLoader) -> list[torch.Tensor]:
    return list(loader)


def _epoch(epoch: int) -> list[torch.Tensor]:
    """Epoch ``epoch`` of a loader of its own, reached by set_epoch before iter()."""
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5)
    loader.set_epoch(epoch)
    return _pass(loader)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_after_iter_and_before_the_first_batch_counts(workers: int) -> None:
    epoch3 = _epoch(3)
    assert not _same(epoch3, _epoch(0))
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5, num_workers=workers)
    it = iter(loader)  # Lightning's order of calls on resume from an epoch-end checkpoint
    loader.set_epoch(3)
    assert _same(list(it), epoch3)
    assert loader.epoch == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_after_the_first_batch_leaves_the_running_pass(workers: int) -> None:
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5, num_workers=workers)
    it = iter(loader)
    first = next(it)
    loader.set_epoch(3)
    rest = list(it)  # the bound pass yields epoch 0 to its end, and moves nothing
    assert _same([first, *rest], _epoch(0))
    assert (loader.epoch, loader.state_dict()["batches_received"]) == (3, 0)
