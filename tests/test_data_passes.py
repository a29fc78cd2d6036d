"""When a pass binds its epoch, and when the order advances (issues 24 and 28)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from torchrepro.data import DataLoader

pytestmark = pytest.mark.usefixtures("each_loader_first")  # loaders stand for separate runs

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


# --- a pass broken off is over (issue 28, part 2) ----------------------------------------


def _broken_off(loader: DataLoader, after: int) -> list[torch.Tensor]:
    """``for i, batch in enumerate(loader): ...; if i == after - 1: break``."""
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if i == after - 1:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_broken_off_ends_its_epoch(workers: int) -> None:
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5, num_workers=workers)
    for epoch in range(3):  # no set_epoch: each pass starts the next epoch's order
        assert _same(_broken_off(loader, 2), _epoch(epoch)[:2])
        assert (loader.epoch, loader.state_dict()["batches_received"]) == (epoch + 1, 0)


def test_a_pass_broken_off_when_the_next_binds_ends_its_epoch() -> None:
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5)
    old = iter(loader)
    next(old)
    new = iter(loader)
    assert loader.epoch == 0  # iter() alone moves nothing
    assert _same([next(new)], _epoch(1)[:1])  # the old pass is over once the new one binds
    assert _same([next(old)], _epoch(0)[1:2])  # the old iterator yields, and moves nothing
    assert loader.state_dict()["batches_received"] == 1


def test_a_pass_without_batches_moves_nothing() -> None:
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5)
    it = iter(loader)
    del it
    iter(loader), iter(loader)
    assert loader.epoch == 0
    assert _same(_pass(loader), _epoch(0))


def test_set_epoch_wins_over_a_broken_off_pass() -> None:
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5)
    _broken_off(loader, 2)
    loader.set_epoch(0)  # the epoch just broken off, again from its first batch
    assert _same(_pass(loader), _epoch(0))
    _broken_off(loader, 1)
    loader.set_epoch(7)
    assert _same(_pass(loader), _epoch(7))


def test_lightning_sanity_check_then_validation_sees_the_whole_epoch() -> None:
    val = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5)
    # Lightning's evaluation loop calls _set_sampler_epoch(loader, epoch) before each run
    # (lightning/pytorch/loops/evaluation_loop.py), which calls loader.sampler.set_epoch.
    val.sampler.set_epoch(0)
    _broken_off(val, 2)  # the sanity check, num_sanity_val_steps=2
    assert val.epoch == 1
    val.sampler.set_epoch(0)  # validation after the first training epoch
    assert _same(_pass(val), _epoch(0))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("saved", ["inside", "after"])
def test_resume_of_a_loop_that_breaks_early_continues_exactly(workers: int, saved: str) -> None:
    """Each pass reads 3 batches; the run saves at pass 1 after its batch 1 (inside the
    loop) or after pass 1 (outside it); a fresh loader runs the rest of the script."""

    def build() -> DataLoader:
        return DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5, num_workers=workers)

    def script(
        loader: DataLoader, passes: range, *, stop: int | None = None, start: int = 0
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        out: list[torch.Tensor] = []
        for p in passes:
            for i, batch in enumerate(loader, start=start if p == passes[0] else 0):
                out.append(batch)
                if (p, i) == (passes[-1], stop):
                    return out, loader.state_dict()  # saved inside the loop
                if i == 2:
                    break
        return out, loader.state_dict()

    reference, _ = script(build(), range(4))
    resumed = build()
    if saved == "inside":
        head, state = script(build(), range(2), stop=1)
        resumed.load_state_dict(state)
        tail, _ = script(resumed, range(1, 4), start=2)
    else:
        head, state = script(build(), range(2))
        resumed.load_state_dict(state)
        tail, _ = script(resumed, range(2, 4))
    assert _same(head + tail, reference)


def test_a_loader_with_a_pass_running_still_pickles() -> None:
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True, seed=5)
    it = iter(loader)
    next(it)
    copy = pickle.loads(pickle.dumps(loader))
    assert copy.state_dict() == loader.state_dict()
