"""User samplers and batch samplers, rebuilds by frameworks, passes and rank read per iteration."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from torchrepro import TorchreproError, isolated_rng
from torchrepro.data import DataLoader

pytestmark = pytest.mark.usefixtures("each_loader_first")  # loaders stand for separate runs

N = 12


class Noisy(Dataset[torch.Tensor]):
    """Each sample: its index and one draw from each global RNG."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        assert type(i) is int  # the dataset only ever sees the indices it expects
        self.loaded.append(i)
        return torch.tensor(
            [float(i), random.random(), float(np.random.random()), torch.rand(()).item()],
            dtype=torch.float64,
        )


class Buckets(Sampler[list[int]]):
    """A length-bucketed batch sampler: shuffles buckets of similar indices, own set_epoch."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.epoch = n, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        buckets = [list(range(i, min(i + self.size, self.n))) for i in range(0, self.n, self.size)]
        random.shuffle(buckets)  # the global RNG, inside torchrepro's seeded context
        for bucket in buckets:
            yield bucket[: 1 + (self.epoch + bucket[0]) % len(bucket)]

    def __len__(self) -> int:
        return (self.n + self.size - 1) // self.size


class Mine(Sampler[int]):
    """A user's own sampler drawing from NumPy's global RNG."""

    def __len__(self) -> int:
        return N

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.permutation(N).tolist())


SAMPLERS: dict[str, Any] = {
    "weighted": lambda: {"sampler": WeightedRandomSampler([1.0] * N, 15), "batch_size": 4},
    "subset": lambda: {"sampler": SubsetRandomSampler(range(2, 11)), "batch_size": 3},
    "random_generator": lambda: {
        "sampler": RandomSampler(range(N), generator=torch.Generator().manual_seed(5)),
        "batch_size": 5,
        "drop_last": True,
    },
    "own": lambda: {"sampler": Mine(), "batch_size": None},
    "buckets": lambda: {"batch_sampler": Buckets(N, 4)},
}


def _epochs(loader: DataLoader[Any], epochs: int = 2) -> list[torch.Tensor]:
    return [b.reshape(-1, 4) for _ in range(epochs) for b in loader]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module", params=sorted(SAMPLERS))
def case(request: pytest.FixtureRequest) -> tuple[str, list[torch.Tensor]]:
    name = request.param
    return name, _epochs(DataLoader(Noisy(), seed=3, **SAMPLERS[name]()))


@pytest.mark.parametrize(("workers", "persistent"), [(1, False), (2, True)])
def test_user_samplers_are_invariant_to_workers(
    case: tuple[str, list[torch.Tensor]], workers: int, persistent: bool
) -> None:
    name, reference = case
    loader = DataLoader(
        Noisy(), seed=3, num_workers=workers, persistent_workers=persistent, **SAMPLERS[name]()
    )
    assert _same(_epochs(loader), reference)


def test_user_samplers_draw_per_epoch_and_per_seed(case: tuple[str, list[torch.Tensor]]) -> None:
    name, reference = case
    half = len(reference) // 2
    assert not _same(reference[:half], reference[half:])
    assert not _same(_epochs(DataLoader(Noisy(), seed=4, **SAMPLERS[name]())), reference)


def test_user_sampler_leaves_the_training_rng_alone(case: tuple[str, list[torch.Tensor]]) -> None:
    name, _ = case
    before = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    list(DataLoader(Noisy(), seed=3, **SAMPLERS[name]()))
    after = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


@pytest.mark.parametrize("stop", [1, 2])
def test_user_sampler_resume_replays_without_loading(
    case: tuple[str, list[torch.Tensor]], stop: int
) -> None:
    name, reference = case
    per_epoch = len(reference) // 2
    stop = min(stop, per_epoch - 1)  # mid-epoch
    first = DataLoader(Noisy(), seed=3, **SAMPLERS[name]())
    it = iter(first)
    head = [next(it).reshape(-1, 4) for _ in range(stop)]
    state = first.state_dict()
    dataset = Noisy()
    resumed = DataLoader(dataset, seed=3, num_workers=0, **SAMPLERS[name]())
    resumed.load_state_dict(state)
    tail = [b.reshape(-1, 4) for b in resumed]
    assert dataset.loaded == torch.cat(tail)[:, 0].long().tolist()  # skipped ones not loaded
    assert _same(head + tail, reference[:per_epoch])
    assert _same(_epochs(resumed, 1), reference[per_epoch:])


class NoLen:
    def __iter__(self) -> Iterator[int]:
        return iter(range(7))


def test_sampler_without_len_ends_its_epoch_when_it_runs_out() -> None:
    loader = DataLoader(Noisy(), batch_size=5, seed=0, sampler=NoLen())
    assert [len(b) for b in loader] == [5, 2]
    assert loader.epoch == 1


# --- rebuilds -------------------------------------------------------------------------


@pytest.mark.parametrize("attribute", ["sampler", "batch_sampler"])
@pytest.mark.parametrize("user_sampler", [False, True])
def test_a_plain_rebuild_fails_at_once_naming_the_caller(
    attribute: str, user_sampler: bool
) -> None:
    extra = {"sampler": SubsetRandomSampler(range(N))} if user_sampler else {"shuffle": True}
    loader = DataLoader(Noisy(), batch_size=4, seed=0, **extra)
    rebuilt = torch.utils.data.DataLoader(loader.dataset, **{attribute: getattr(loader, attribute)})
    with (
        isolated_rng(),  # torch's own iterator draws its base seed from the global RNG
        pytest.raises(TorchreproError, match=r"loader.sampler of a torchrepro.DataLoader was iter"),
    ):
        next(iter(rebuilt))
    with pytest.raises(TorchreproError, match=r"by test_data_samplers.test_a_plain_rebuild"):
        list(getattr(loader, attribute))


@pytest.mark.parametrize("attribute", ["sampler", "batch_sampler"])
def test_rebuild_with_a_user_batch_sampler_fails_too(attribute: str) -> None:
    loader = DataLoader(Noisy(), seed=0, batch_sampler=Buckets(N, 4))
    rebuilt = torch.utils.data.DataLoader(loader.dataset, batch_sampler=loader.batch_sampler)
    with (
        isolated_rng(),
        pytest.raises(TorchreproError, match=r"rebuilds the loader from its attributes"),
    ):
        next(iter(rebuilt))
    with pytest.raises(TorchreproError, match=r"rebuilds the loader from its attributes"):
        list(getattr(loader, attribute))


def test_torchrepro_rebuild_from_attributes_keeps_every_guarantee() -> None:
    loader = DataLoader(Noisy(), batch_size=4, shuffle=True, seed=7, drop_last=True)
    reference = _epochs(loader)
    by_sampler = DataLoader(
        loader.dataset, batch_size=4, sampler=loader.sampler, seed=loader.seed, drop_last=True
    )
    by_batch_sampler = DataLoader(
        loader.dataset, batch_sampler=loader.batch_sampler, seed=loader.seed, num_workers=2
    )
    assert _same(_epochs(by_sampler), reference)
    assert _same(_epochs(by_batch_sampler), reference)


def test_lightning_injects_a_distributed_sampler(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what importing Lightning sets
    with isolated_rng():  # importing Lightning draws from the global RNGs
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
        from lightning.pytorch.utilities.data import _update_dataloader

    loader = DataLoader(Noisy(), batch_size=4, shuffle=True, seed=7)
    reference = _epochs(loader)
    # What Lightning 2.6 does under DDP for a loader built outside its hooks.
    wrapper = DistributedSamplerWrapper(loader.sampler, num_replicas=1, rank=0, shuffle=False)
    with caplog.at_level(logging.INFO, logger="torchrepro"):
        rebuilt = _update_dataloader(loader, wrapper)
    assert isinstance(rebuilt, DataLoader)
    assert "DistributedSamplerWrapper around a torchrepro loader's sampler replaced" in caplog.text
    assert _same(_epochs(rebuilt), reference)
    # A DistributedSampler over the dataset matching the process group is replaced too.
    plain = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True)
    assert _same(_epochs(_update_dataloader(loader, plain)), reference)


def test_distributed_sampler_for_another_rank_is_kept() -> None:
    # torch's own test: DistributedSampler(num_replicas=4, rank=r) outside a process group.
    seen = [
        int(x)
        for r in range(4)
        for b in DataLoader(
            list(range(9)),
            batch_size=2,
            drop_last=True,
            seed=0,
            sampler=DistributedSampler(list(range(9)), 4, r),
        )
        for x in b
    ]
    assert len(seen) == len(set(seen)) == 8


# --- passes: set_epoch, rank read per iteration (break-off: test_data_passes.py) -------


@pytest.mark.parametrize("workers", [0, 2])
def test_load_state_dict_continues_only_the_next_pass(workers: int) -> None:
    loader = DataLoader(Noisy(10), batch_size=2, shuffle=True, seed=1, num_workers=workers)
    whole = _epochs(loader, 1)
    fresh = DataLoader(Noisy(10), batch_size=2, shuffle=True, seed=1, num_workers=workers)
    it = iter(fresh)
    next(it), next(it), next(it)
    state = fresh.state_dict()
    resumed = DataLoader(Noisy(10), batch_size=2, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # HF Trainer calls this right after a resume: keeps the position
    assert resumed.state_dict() == state
    assert _same([b.reshape(-1, 4) for b in resumed], whole[3:])
    assert resumed.epoch == 1


def test_set_epoch_to_another_epoch_starts_it() -> None:
    loader = DataLoader(Noisy(10), batch_size=2, shuffle=True, seed=1)
    it = iter(loader)
    next(it)
    loader.sampler.set_epoch(3)  # Lightning calls set_epoch on the sampler
    assert (loader.epoch, loader.state_dict()["batches_received"]) == (3, 0)
    reference = DataLoader(Noisy(10), batch_size=2, shuffle=True, seed=1)
    reference.set_epoch(3)
    assert _same(_epochs(loader, 1), _epochs(reference, 1))


def _fake_world(monkeypatch: pytest.MonkeyPatch, world: int, rank: int) -> None:
    from torchrepro.core import _dist

    monkeypatch.setattr(_dist, "world_size", lambda: world)
    monkeypatch.setattr(_dist, "group_rank", lambda: rank)


def test_rank_and_world_size_are_read_when_iteration_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = _epochs(DataLoader(Noisy(), batch_size=4, shuffle=True, seed=2), 1)
    built = [DataLoader(Noisy(), batch_size=2, shuffle=True, seed=2) for _ in range(2)]
    per_rank = []
    for rank, loader in enumerate(built):  # built before the "process group" exists
        _fake_world(monkeypatch, 2, rank)
        assert len(loader) == 3
        per_rank.append(_epochs(loader, 1))
    merged = [torch.cat([per_rank[0][g], per_rank[1][g]]) for g in range(3)]
    assert _same(merged, whole)


@pytest.mark.parametrize("stop", [1, 2])
def test_world_size_change_with_a_constant_global_batch(
    monkeypatch: pytest.MonkeyPatch, stop: int
) -> None:
    whole = _epochs(DataLoader(Noisy(), batch_size=4, shuffle=True, seed=2), 1)
    first = DataLoader(Noisy(), batch_size=4, shuffle=True, seed=2)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    per_rank = []
    for rank in range(2):
        _fake_world(monkeypatch, 2, rank)
        resumed = DataLoader(Noisy(), batch_size=2, shuffle=True, seed=2)  # global batch 4
        with pytest.raises(ValueError, match=r"made with world_size=1, but this loader runs"):
            resumed.load_state_dict(state)
        resumed.load_state_dict(state, strict=False)
        per_rank.append([b.reshape(-1, 4) for b in resumed])
    merged = [torch.cat([a, b]) for a, b in zip(*per_rank, strict=True)]
    assert _same(merged, whole[stop:])


def test_user_sampler_state_refuses_another_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = DataLoader(Noisy(), batch_size=2, seed=0, sampler=SequentialSampler(range(N)))
    state = loader.state_dict()
    _fake_world(monkeypatch, 2, 0)
    with pytest.raises(ValueError, match=r"a sampler's stream is per rank"):
        loader.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match=r"loader state 'order' is 'sampler'"):
        DataLoader(Noisy(), batch_size=2, seed=0).load_state_dict(state)


def test_batch_sampler_rebuilt_around_ours_is_not_split_twice() -> None:
    loader = DataLoader(Noisy(), batch_size=3, shuffle=True, seed=5)
    wrapped = DataLoader(Noisy(), batch_sampler=BatchSampler(loader.sampler, 3, False), seed=5)
    indices = sorted(int(x) for b in wrapped for x in b[:, 0])
    assert indices == list(range(N))


@pytest.mark.parametrize("attribute", ["sampler", "batch_sampler"])
def test_torchrepro_rebuild_from_a_user_sampler_is_the_same_loader(attribute: str) -> None:
    name = "buckets" if attribute == "batch_sampler" else "weighted"
    loader = DataLoader(Noisy(), seed=3, **SAMPLERS[name]())
    reference = _epochs(loader)
    extra = {} if attribute == "batch_sampler" else {"batch_size": loader.batch_size}
    rebuilt = DataLoader(loader.dataset, seed=3, **{attribute: getattr(loader, attribute)}, **extra)
    assert _same(_epochs(rebuilt), reference)


def test_user_batch_sampler_under_spawn() -> None:  # one case: spawn is slow
    reference = _epochs(DataLoader(Noisy(), seed=3, batch_sampler=Buckets(N, 4)))
    loader = DataLoader(
        Noisy(), seed=3, num_workers=2, multiprocessing_context="spawn", batch_sampler=Buckets(N, 4)
    )
    assert _same(_epochs(loader), reference)
