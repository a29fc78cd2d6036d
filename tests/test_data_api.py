"""DataLoader arguments, env vars, sample_seed(), RNG-object warnings, iterable datasets, order."""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms import v2

from torchrepro import TorchreproError, TorchreproWarning
from torchrepro.core._seed import derive_words
from torchrepro.data import DataLoader, sample_seed
from torchrepro.data._sampler import Order
from torchrepro.data._seeding import _Seeder

pytestmark = pytest.mark.usefixtures("each_loader_first")  # loaders stand for separate runs


class Draws(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(
            [float(i), random.random(), np.random.random(), torch.rand(()).item()],
            dtype=torch.float64,
        )


# --- arguments and environment ------------------------------------------------------


def test_seed_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHREPRO_SEED", raising=False)
    with pytest.raises(ValueError, match=r"needs a seed: pass seed=<int>, or call torchrepro"):
        DataLoader(Draws())


@pytest.mark.parametrize(
    ("seed", "error", "match"),
    [
        (-3, ValueError, r"seed must be an int in \[0, 2\*\*64 - 1\], got -3"),
        (2**64, ValueError, r"got 18446744073709551616"),
        ("1", TypeError, r"seed must be an int .*got str '1'"),
        (True, TypeError, r"got bool True"),
    ],
)
def test_bad_seeds(seed: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DataLoader(Draws(), seed=seed)


def test_seed_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHREPRO_SEED", "42")
    from_env = torch.cat(list(DataLoader(Draws(), batch_size=2)))
    assert DataLoader(Draws()).seed == 42
    assert torch.equal(from_env, torch.cat(list(DataLoader(Draws(), batch_size=2, seed=42))))
    assert not torch.equal(from_env, torch.cat(list(DataLoader(Draws(), batch_size=2, seed=43))))
    monkeypatch.setenv("TORCHREPRO_SEED", "-1")
    with pytest.raises(ValueError, match=r"TORCHREPRO_SEED must be an integer in \[0, "):
        DataLoader(Draws())


@pytest.mark.parametrize("raw", ["two", "-1", "1.5"])
def test_bad_num_workers_env(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("TORCHREPRO_NUM_WORKERS", raw)
    with pytest.raises(
        ValueError, match=rf"TORCHREPRO_NUM_WORKERS must be an integer in \[0, 1024\], got '{raw}'"
    ):
        DataLoader(Draws(), seed=0)


def test_num_workers_env_replaces_argument(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHREPRO_NUM_WORKERS", "2")
    assert DataLoader(Draws(), seed=0).num_workers == 2
    monkeypatch.setenv("TORCHREPRO_NUM_WORKERS", "0")
    with caplog.at_level(logging.INFO, logger="torchrepro"):
        loader = DataLoader(
            Draws(), seed=0, num_workers=4, persistent_workers=True, prefetch_factor=3, timeout=5
        )
    assert loader.num_workers == 0
    assert not loader.persistent_workers
    assert loader.prefetch_factor is None
    assert "persistent_workers=True is dropped" in caplog.text
    assert "prefetch_factor=3 is dropped" in caplog.text
    list(loader)  # torch would refuse timeout/persistent workers with num_workers=0


def test_shuffle_must_be_bool() -> None:
    with pytest.raises(TypeError, match=r"shuffle must be a bool, got str"):
        DataLoader(Draws(), shuffle="yes", seed=0)  # type: ignore[arg-type]


_worker_draw = 0.0


def _record_worker(worker_id: int) -> None:
    global _worker_draw
    _worker_draw = random.random()  # reproducible: torchrepro seeded this worker first


class WorkerDraw(Dataset[float]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> float:
        return _worker_draw


def test_user_worker_init_fn_runs_after_ours() -> None:
    def run(seed: int) -> list[float]:
        loader = DataLoader(
            WorkerDraw(), batch_size=None, seed=seed, num_workers=2, worker_init_fn=_record_worker
        )
        return [float(x) for x in loader]

    first = run(0)
    assert 0.0 not in first  # the user's function ran in each worker
    assert len(set(first)) == 2  # once per worker, each with its own stream
    assert run(1) != first
    # A function of (seed, worker id) only: not of how many times workers were started.
    loader = DataLoader(
        WorkerDraw(), batch_size=None, seed=0, num_workers=2, worker_init_fn=_record_worker
    )
    assert [[float(x) for x in loader] for _ in range(3)] == [first] * 3


# --- what frameworks see --------------------------------------------------------------


def test_dataset_attribute_is_the_users_dataset() -> None:
    dataset = Draws()
    loader = DataLoader(dataset, batch_size=4, seed=0, num_workers=1, persistent_workers=True)
    assert loader.dataset is dataset
    list(loader)
    assert loader.dataset is dataset
    list(loader)  # the persistent iterator's reset keeps the seeding wrapper
    assert loader.dataset is dataset
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert (loader.batch_size, loader.drop_last, len(loader)) == (4, False, 2)
    with pytest.raises(ValueError, match="dataset attribute should not be set"):
        loader.dataset = Draws()


def test_drop_last_and_no_batching() -> None:
    assert [
        b.tolist() for b in DataLoader(list(range(5)), batch_size=2, drop_last=True, seed=0)
    ] == [
        [0, 1],
        [2, 3],
    ]
    unbatched = DataLoader(list(range(3)), batch_size=None, seed=0)
    assert [int(x) for x in unbatched] == [0, 1, 2]
    assert unbatched.state_dict()["batch_size"] is None


# --- sample_seed and the per-sample streams -------------------------------------------


def test_sample_seed_outside_a_sample_raises() -> None:
    with pytest.raises(TorchreproError, match=r"sample_seed\(\) was called outside a sample load"):
        sample_seed()


class Streams(Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "seed": torch.tensor(sample_seed(), dtype=torch.uint64),
            "py": random.random(),
            "np": np.random.random(),
            "torch": torch.rand(()),
        }


def test_streams_follow_the_documented_derivation() -> None:
    loader = DataLoader(Streams(), batch_size=None, shuffle=True, seed=9)
    loader.set_epoch(4)
    indices = Order(length=3, batch_size=1, drop_last=False, shuffle=True, seed=9).indices(4, 0)
    for sample, index in zip(loader, indices, strict=True):
        seed_word, py, np_word, torch_word = derive_words(9, "sample", 4, index, words=4)
        assert int(sample["seed"]) == seed_word
        assert sample["py"] == random.Random(py).random()
        assert sample["np"] == np.random.RandomState(np_word & 0xFFFFFFFF).random_sample()
        expected = torch.rand((), generator=torch.Generator().manual_seed(torch_word))
        assert torch.equal(sample["torch"], expected)


def test_sample_seeds_do_not_collide_on_a_large_grid() -> None:
    seeder = _Seeder(0, "sample")
    words = [seeder.words(epoch, index) for epoch in range(10) for index in range(10_000)]
    # What each library is actually seeded with: random 64 bits, NumPy and torch 32 bits
    # (torch's CPU generator keeps the low 32 bits of any seed; NumPy's fast path takes 32).
    used = [(w[1], w[2] & 0xFFFFFFFF, w[3] & 0xFFFFFFFF) for w in words]
    assert len({u[0] for u in used}) == len(used)  # Python's streams never repeat
    assert len(set(used)) == len(used)  # nor does any sample's whole augmentation stream
    # A 32-bit stream alone may repeat among ~1e5 samples (birthday bound n**2 / 2**33);
    # the second library's stream then still differs.
    for k in (1, 2):
        repeats = len(used) - len({u[k] for u in used})
        assert repeats <= 10
    assert words[12345] == derive_words(0, "sample", 1, 2345, words=4)


# --- RNG objects held by the dataset --------------------------------------------------


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)


class WithRngs(Draws):
    def __init__(self) -> None:
        self.transform = v2.Compose([v2.RandomHorizontalFlip(), Holder()])
        self.config = {"gen": np.random.default_rng(0), "ok": [1, 2, 3]}
        self.loop = self  # cycles are fine


def test_dataset_rngs_are_reported_with_their_path() -> None:
    with pytest.warns(TorchreproWarning) as record:
        DataLoader(WithRngs(), seed=0)
    message = str(record[0].message)
    assert "dataset.transform.transforms[1].rng (random.Random)" in message
    assert "dataset.config['gen'] (numpy.random._generator.Generator)" in message


def test_clean_dataset_does_not_warn() -> None:
    dataset = Draws()
    dataset.numpy_global = np.random  # type: ignore[attr-defined]
    dataset.torch_global = torch.default_generator  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataLoader(dataset, seed=0)


# --- iterable datasets ----------------------------------------------------------------


class Stream(IterableDataset[torch.Tensor]):
    def __init__(self, n: int = 6) -> None:
        self.n = n
        self.position = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        start = self.position
        for i in range(start, self.n):
            if i % workers == worker:
                self.position = i + 1
                yield torch.tensor(
                    [float(i), torch.rand(()).item(), random.random()], dtype=torch.float64
                )
        self.position = 0  # a finished pass starts over


class StatefulStream(Stream):
    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_is_reproducible_for_fixed_workers(workers: int) -> None:
    def run() -> list[torch.Tensor]:
        loader = DataLoader(Stream(), batch_size=2, seed=0, num_workers=workers)
        return [torch.cat(list(loader)) for _ in range(2)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0][:, 1:], first[1][:, 1:])  # epochs differ


def test_iterable_resume_with_a_stateful_dataset() -> None:
    whole = torch.cat(list(DataLoader(StatefulStream(), batch_size=2, seed=0)))
    loader = DataLoader(StatefulStream(), batch_size=2, seed=0)
    it = iter(loader)
    head = next(it)
    state = loader.state_dict()  # inside the pass: its iterator is alive
    assert (state["epoch"], state["items_received"], state["dataset_state"]) == (
        0,
        2,
        {"position": 2},
    )
    resumed = DataLoader(StatefulStream(), batch_size=2, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([head, *resumed]), whole)
    assert resumed.epoch == 1


def test_iterable_refusals() -> None:
    with pytest.raises(
        TorchreproError, match=r"IterableDataset can only be resumed when it has state_dict"
    ):
        DataLoader(Stream(), seed=0).state_dict()
    with pytest.raises(TorchreproError, match=r"need num_workers=0 with an IterableDataset"):
        DataLoader(StatefulStream(), seed=0, num_workers=2).state_dict()
    with pytest.raises(ValueError, match=r"IterableDataset: expected unspecified shuffle"):
        DataLoader(Stream(), seed=0, shuffle=True)


# --- the global order, split across ranks ---------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 60),
    batch=st.integers(1, 6),
    world=st.integers(1, 4),
    drop_last=st.booleans(),
    epoch=st.integers(0, 2),
    algorithm=st.sampled_from(["feistel", "randperm"]),
)
def test_ranks_split_one_global_order(
    n: int, batch: int, world: int, drop_last: bool, epoch: int, algorithm: str
) -> None:
    def order(**kwargs: Any) -> Order:
        return Order(shuffle=True, seed=3, length=n, algorithm=algorithm, **kwargs)

    orders = [
        order(batch_size=batch, drop_last=drop_last, world_size=world, rank=r) for r in range(world)
    ]
    # The global order: one rank, one sample per batch.
    perm = list(order(batch_size=1, drop_last=False).indices(epoch, 0))
    assert sorted(perm) == list(range(n))
    if algorithm == "randperm":
        assert perm == orders[0].permutation(epoch).tolist()
    per_rank = [list(order.indices(epoch, 0)) for order in orders]
    assert {len(r) for r in per_rank} == {orders[0].samples_per_rank()}
    batches = [[ranks[i : i + batch] for i in range(0, len(ranks), batch)] for ranks in per_rank]
    assert {len(b) for b in batches} == {orders[0].batches_per_epoch()}
    merged = [
        index for g in range(len(batches[0])) for r in range(world) for index in batches[r][g]
    ]
    full = n // (batch * world) * batch * world
    if drop_last or n == full:
        assert merged == perm[:full]
    else:
        tail = -(-(n - full) // world) * world
        assert merged == [perm[p % n] for p in range(full + tail)]
    for start in range(len(batches[0])):  # resuming skips whole batches of every rank
        assert list(orders[-1].indices(epoch, start)) == [i for b in batches[-1][start:] for i in b]
