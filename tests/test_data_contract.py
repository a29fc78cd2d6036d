"""The rest of torch's DataLoader contract, argument checks, threads, NumPy and CUDA streams."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from torchrepro import TorchreproError, isolated_rng
from torchrepro.data import DataLoader, sample_seed


class Draws(Dataset[torch.Tensor]):
    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), random.random(), torch.rand(()).item()], dtype=torch.float64)


# --- torch's contract -------------------------------------------------------------------


class WorkerView(Dataset[str]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> str:
        info = get_worker_info()
        return "main" if info is None else type(info.dataset).__name__


def _shard_by_info(worker_id: int) -> None:
    info = get_worker_info()
    assert info is not None
    info.dataset.start = worker_id  # torch's documented sharding recipe


class Sharded(IterableDataset[int]):
    start = -1

    def __iter__(self) -> Iterator[int]:
        info = get_worker_info()
        step = 1 if info is None else info.num_workers
        return iter(range(self.start, 6, step))


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_info_dataset_is_the_users(workers: int) -> None:
    loader = DataLoader(WorkerView(), batch_size=None, seed=0, num_workers=workers)
    assert set(loader) == {"WorkerView"}
    sharded = DataLoader(
        Sharded(), batch_size=None, seed=0, num_workers=workers, worker_init_fn=_shard_by_info
    )
    assert sorted(sharded) == list(range(6))


class Batched(Dataset[torch.Tensor]):
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        raise AssertionError("the batched path must be used")

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        assert type(indices) is list and all(type(i) is int for i in indices)
        self.calls.append(indices)
        noise = torch.rand(len(indices))
        return [
            torch.stack([torch.tensor(float(i)), n]) for i, n in zip(indices, noise, strict=True)
        ]


def test_getitems_keeps_its_batched_fast_path() -> None:
    dataset = Batched()
    first = list(DataLoader(dataset, batch_size=4, shuffle=True, seed=0))
    assert [len(c) for c in dataset.calls] == [4, 2]
    again = list(DataLoader(Batched(), batch_size=4, shuffle=True, seed=0, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_dataset_length_is_read_per_epoch() -> None:
    data = [torch.tensor(float(i)) for i in range(4)]
    loader = DataLoader(data, batch_size=1, shuffle=True, seed=0)
    assert len(list(loader)) == 4
    data.append(torch.tensor(4.0))
    assert len(loader) == 5
    assert sorted(float(x) for x in loader) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_loader_is_subscriptable() -> None:
    alias = DataLoader[list[torch.Tensor]]
    assert alias.__origin__ is DataLoader  # type: ignore[attr-defined]


class Seeds(Dataset[int]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return torch.initial_seed()


def _init_seed(worker_id: int) -> None:
    info = get_worker_info()
    assert info is not None and info.seed == torch.initial_seed()


def test_seeds_stay_in_torchs_int64_range() -> None:
    for workers in (0, 2):
        loader = DataLoader(
            Seeds(), batch_size=4, seed=2**64 - 1, num_workers=workers, worker_init_fn=_init_seed
        )
        batches = list(loader)  # collated as int64: overflows above 2**63 - 1
        assert all(b.dtype == torch.int64 and bool((b >= 0).all()) for b in batches)


class Counting(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(worker, 8, workers):
            yield torch.tensor([float(i), torch.rand(()).item()])


@pytest.mark.parametrize("in_order", [True, False])
def test_iterable_with_persistent_workers(in_order: bool) -> None:
    def epochs(**kwargs: Any) -> list[torch.Tensor]:
        loader = DataLoader(Counting(), batch_size=2, seed=0, num_workers=2, **kwargs)
        return [torch.cat(sorted(loader, key=lambda b: float(b[0, 0]))) for _ in range(2)]

    with pytest.warns(UserWarning, match=r"in_order=False: each batch's contents are reprod"):
        DataLoader(Counting(), seed=0, num_workers=2, in_order=False)
    reference = epochs()
    persistent = epochs(persistent_workers=True, in_order=in_order)
    assert all(torch.equal(a, b) for a, b in zip(reference, persistent, strict=True))
    assert not torch.equal(reference[0], reference[1])  # the epoch reached the workers


class Resettable(IterableDataset[int]):
    """Resets its position in __iter__ (as many do); torchdata loads state after iter()."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self) -> Resettable:
        self.position = 0
        return self

    def __next__(self) -> int:
        if self.position >= 6:
            raise StopIteration
        self.position += 1
        return self.position - 1

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def test_stateful_iterable_gets_its_state_after_iter() -> None:
    loader = DataLoader(Resettable(), batch_size=2, seed=0)
    it = iter(loader)
    head = [next(it)]
    resumed = DataLoader(Resettable(), batch_size=2, seed=0)
    resumed.load_state_dict(loader.state_dict())
    assert [int(x) for b in head + list(resumed) for x in b] == list(range(6))


def test_iterator_exposes_torchs_attributes() -> None:
    it = iter(DataLoader(Draws(), batch_size=2, seed=0, num_workers=2))
    assert len(it._workers) == 2
    next(it)
    it._shutdown_workers()


# --- argument checks (issue 11) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_workers": "2"}, TypeError, r"num_workers must be an int >= 0, got str '2'"),
        ({"num_workers": 2.0}, TypeError, r"num_workers must be an int >= 0, got float"),
        ({"batch_size": "4"}, TypeError, r"batch_size must be an int >= 1 or None, got str"),
        ({"shuffle": "yes"}, TypeError, r"shuffle must be a bool, got str 'yes'"),
        ({"drop_last": 1}, TypeError, r"drop_last must be a bool, got int 1"),
        ({"timeout": "5"}, TypeError, r"timeout must be a number >= 0, got str"),
        ({"num_workers": -1}, ValueError, r"num_workers option should be non-negative"),
    ],
)
def test_bad_arguments_name_themselves(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        DataLoader(Draws(), seed=0, **kwargs)


def test_dataset_none_is_refused() -> None:
    with pytest.raises(TypeError, match=r"dataset must be a map-style dataset .* got NoneType"):
        DataLoader(None, seed=0)


def test_huge_num_workers_env_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHREPRO_NUM_WORKERS", "99999999999999999999")
    with pytest.raises(
        ValueError, match=r"TORCHREPRO_NUM_WORKERS must be an integer in \[0, 1024\]"
    ):
        DataLoader(Draws(), seed=0)


@pytest.mark.parametrize(
    ("epoch", "error"), [(2**64, ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError)]
)
def test_bad_epochs_are_refused(epoch: Any, error: type[Exception]) -> None:
    loader = DataLoader(Draws(), seed=0)
    with pytest.raises(error, match=r"epoch must be an int in \[0, 2\*\*64 - 1\]"):
        loader.set_epoch(epoch)
    loader.set_epoch(2**64 - 1)  # the largest epoch still loads
    assert len(list(loader)) == 8
    it = iter(loader)  # the pass binds its epoch at its first next()
    with pytest.raises(ValueError, match=r"the loader's epoch must be an int in .*got 1844674"):
        next(it)


# --- threads, NumPy's bit generator, CUDA streams (issue 11) -----------------------------


def test_loading_in_another_thread_is_refused() -> None:
    errors: list[BaseException] = []

    def consume(loader: DataLoader[Any]) -> None:
        try:
            list(loader)
        except BaseException as e:
            errors.append(e)

    for loader in (
        DataLoader(Draws(), seed=0),
        DataLoader(Draws(), seed=0, num_workers=1, sampler=list(range(8))),
    ):
        thread = threading.Thread(target=consume, args=(loader,), name="prefetcher")
        thread.start()
        thread.join()
    assert len(errors) == 2
    assert all(isinstance(e, TorchreproError) for e in errors)
    assert "iterated in thread 'prefetcher'" in str(errors[0])
    # With workers and torchrepro's order nothing in the main process draws: allowed.
    thread = threading.Thread(target=consume, args=(DataLoader(Draws(), seed=0, num_workers=1),))
    thread.start()
    thread.join()
    assert len(errors) == 2


def test_numpy_set_bit_generator_is_followed() -> None:
    class NumpyDraws(Dataset[float]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> float:
            return float(np.random.random())

    with isolated_rng():
        original = np.random.mtrand._rand._bit_generator
        list(DataLoader(NumpyDraws(), batch_size=2, seed=0))  # builds the fast path
        try:
            np.random.set_bit_generator(np.random.PCG64(7))
            before = np.random.mtrand._rand._bit_generator.state
            first = [float(x) for b in DataLoader(NumpyDraws(), batch_size=2, seed=0) for x in b]
            assert np.random.mtrand._rand._bit_generator.state == before  # restored
            again = [float(x) for b in DataLoader(NumpyDraws(), batch_size=2, seed=0) for x in b]
            assert first == again
        finally:
            np.random.set_bit_generator(original)


class GpuDraws(Dataset[torch.Tensor]):
    """Draws from what stands in for the current CUDA device's generator."""

    gen: torch.Generator

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(2, generator=self.gen)


def test_cuda_generators_are_seeded_per_sample_and_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: a CPU generator stands in for CUDA's default generator; the code under
    # test only calls manual_seed/get_state/set_state on it, as it would on a CUDA one.
    fake = torch.Generator().manual_seed(123)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "default_generators", (fake,))
    monkeypatch.setattr("torchrepro.data._seeding._cuda_initialized", lambda: True)
    GpuDraws.gen = fake
    state = fake.get_state()
    shuffled = list(DataLoader(GpuDraws(), batch_size=2, shuffle=True, seed=0))
    assert torch.equal(fake.get_state(), state)  # the training loop's stream is untouched
    plain = list(DataLoader(GpuDraws(), batch_size=2, seed=0))
    # Per sample: the same sample draws the same whatever its position in the epoch.
    by_value = {tuple(r.tolist()) for b in shuffled for r in b}
    assert by_value == {tuple(r.tolist()) for b in plain for r in b}


def test_sample_seed_is_the_same_under_getitems_and_getitem() -> None:
    class Seeded(Dataset[int]):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> int:
            return sample_seed() % 1000

    a = [int(x) for b in DataLoader(Seeded(), batch_size=3, seed=0) for x in b]
    b = [int(x) for x in DataLoader(Seeded(), batch_size=None, seed=0)]
    assert a == b and len(set(a)) == 3


@pytest.mark.parametrize("copy_with", ["pickle", "deepcopy"])
def test_loader_survives_pickle_and_deepcopy(copy_with: str) -> None:
    import copy
    import pickle

    for extra in ({"shuffle": True}, {"sampler": [3, 1, 2]}):
        loader = DataLoader(Draws(), batch_size=2, seed=0, **extra)
        if copy_with == "pickle":
            twin = pickle.loads(pickle.dumps(loader))
        else:
            twin = copy.deepcopy(loader)
        assert all(torch.equal(a, b) for a, b in zip(loader, twin, strict=True))
        assert twin.sampler._loader() is twin


def test_cuda_started_by_the_dataset_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchrepro import TorchreproWarning
    from torchrepro.data import _isolate

    started: list[bool] = []

    class StartsCuda(Dataset[int]):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> int:
            started.append(True)  # stands for the first CUDA call
            return i

    monkeypatch.setattr(_isolate, "_cuda_warned", False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(torch.cuda, "default_generators", ())
    with pytest.warns(TorchreproWarning, match=r"CUDA was initialised while torchrepro"):
        list(DataLoader(StartsCuda(), seed=0))


@pytest.mark.parametrize("dataset", [Draws(), Counting()], ids=["map", "iterable"])
def test_persistent_workers_exit_when_the_loader_is_dropped(dataset: Any) -> None:
    loader = DataLoader(dataset, batch_size=2, seed=0, num_workers=2, persistent_workers=True)
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    del it, loader  # no reference cycle may keep the workers alive until a GC pass
    for worker in workers:
        worker.join(20)
        assert not worker.is_alive()
