"""The loader's output is a function of (seed, epoch, index) only, and leaves the main RNGs alone."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

import torchrepro
from torchrepro.data import DataLoader, sample_seed

N, BATCH = 10, 3
pytestmark = [
    pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes"),
    pytest.mark.usefixtures("each_loader_first"),  # loaders stand for separate runs
]


class Augmented(Dataset[dict[str, Any]]):
    """Draws from random, numpy.random, torch and torchvision v2 random transforms."""

    def __init__(self, n: int = N) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=gen)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(8, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "index": i,
            "image": self.transform(self.images[i]),
            "py": random.random(),
            "np": np.random.random(),
            "torch": torch.rand(2),
            "seed": torch.tensor(sample_seed() >> 1),  # fits int64
        }


def _epochs(loader: DataLoader, epochs: int = 2) -> list[list[dict[str, Any]]]:
    return [list(loader) for _ in range(epochs)]


def _assert_same(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]]) -> None:
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b, strict=True):
        assert len(epoch_a) == len(epoch_b)
        for batch_a, batch_b in zip(epoch_a, epoch_b, strict=True):
            assert batch_a.keys() == batch_b.keys()
            for key in batch_a:
                assert torch.equal(batch_a[key], batch_b[key]), key


@pytest.fixture(scope="module")
def reference() -> list[list[dict[str, Any]]]:
    return _epochs(DataLoader(Augmented(), batch_size=BATCH, shuffle=True, seed=11))


# Every fork combination; spawn re-imports torch and torchvision in every worker (seconds
# each), so a subset of it.
CASES = [
    ("fork", workers, persistent, prefetch)
    for workers in (1, 2, 3)
    for persistent in (False, True)
    for prefetch in (1, 4)
] + [("spawn", 1, False, 4), ("spawn", 2, True, 1)]


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
@pytest.mark.parametrize(("start", "workers", "persistent", "prefetch"), CASES)
def test_workers_match_main_process(
    reference: list[list[dict[str, Any]]], start: str, workers: int, persistent: bool, prefetch: int
) -> None:
    loader = DataLoader(
        Augmented(),
        batch_size=BATCH,
        shuffle=True,
        seed=11,
        num_workers=workers,
        persistent_workers=persistent,
        prefetch_factor=prefetch,
        # torch ignores pin_memory without an accelerator, with a warning
        pin_memory=start == "fork" and prefetch == 4,
        multiprocessing_context=start,
    )
    _assert_same(_epochs(loader), reference)


def test_epochs_seeds_and_samples_all_differ(reference: list[list[dict[str, Any]]]) -> None:
    samples = [
        {key: batch[key][row] for key in batch}
        for epoch in reference
        for batch in epoch
        for row in range(len(batch["index"]))
    ]
    assert len(samples) == 2 * N
    # No two samples share a stream (the duplicated-worker-RNG bug): every draw differs.
    for key in ("py", "np", "seed"):
        assert len({float(s[key]) if key != "seed" else int(s[key]) for s in samples}) == 2 * N
    assert len({tuple(s["torch"].tolist()) for s in samples}) == 2 * N
    # The same image gets other augmentations in the next epoch, and the order changes.
    first = {int(s["index"]): s["image"] for s in samples[:N]}
    second = {int(s["index"]): s["image"] for s in samples[N:]}
    assert all(not torch.equal(first[i], second[i]) for i in range(N))
    assert [int(s["index"]) for s in samples[:N]] != [int(s["index"]) for s in samples[N:]]
    assert sorted(first) == list(range(N))


def test_another_seed_gives_other_batches(reference: list[list[dict[str, Any]]]) -> None:
    other = _epochs(DataLoader(Augmented(), batch_size=BATCH, shuffle=True, seed=12))
    assert not torch.equal(reference[0][0]["torch"], other[0][0]["torch"])


class Noise(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(())


def _folk_seed(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def test_folk_recipe_depends_on_num_workers() -> None:
    """The problem solved here: seed everything + worker_init_fn still varies with workers."""

    def folk(workers: int) -> torch.Tensor:
        with torchrepro.isolated_rng():
            torch.manual_seed(0)
            loader = torch.utils.data.DataLoader(
                Noise(),
                batch_size=2,
                num_workers=workers,
                worker_init_fn=_folk_seed,
                multiprocessing_context="fork" if workers else None,
            )
            return torch.cat(list(loader))

    def ours(workers: int) -> torch.Tensor:
        loader = DataLoader(Noise(), batch_size=2, seed=0, num_workers=workers)
        return torch.cat(list(loader))

    assert not torch.equal(folk(0), folk(2))
    assert torch.equal(ours(0), ours(2))


def _training_draws(loader: DataLoader | None, steps: int = 6) -> list[Any]:
    with torchrepro.isolated_rng():
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        draws: list[Any] = []
        batches = iter(loader) if loader is not None else None
        for _ in range(steps):
            # randn() leaves NumPy's legacy Gaussian cache full on every other step.
            draws.append((random.random(), float(np.random.randn()), torch.rand(3)))
            if loader is not None:
                try:
                    next(batches)  # type: ignore[arg-type]
                except StopIteration:
                    batches = iter(loader)  # a new epoch, as a training loop does
    return draws


@pytest.mark.parametrize("workers", [0, 2])
def test_main_process_rng_untouched(workers: int) -> None:
    without = _training_draws(None)
    loader = DataLoader(Augmented(), batch_size=BATCH, shuffle=True, seed=3, num_workers=workers)
    with_loader = _training_draws(loader)
    for (py_a, np_a, t_a), (py_b, np_b, t_b) in zip(without, with_loader, strict=True):
        assert py_a == py_b
        assert np_a == np_b
        assert torch.equal(t_a, t_b)


def test_loader_leaves_global_state_as_found() -> None:
    before = torchrepro.get_rng_state()
    list(DataLoader(Augmented(), batch_size=BATCH, shuffle=True, seed=3))
    after = torchrepro.get_rng_state()
    assert before["python"] == after["python"]
    assert before["numpy"] == after["numpy"]
    assert torch.equal(before["torch"], after["torch"])


class Gaussians(Dataset[float]):
    """Leaves NumPy's legacy Gaussian cache full after each sample."""

    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int) -> float:
        return float(np.random.randn())


@pytest.mark.parametrize("gaussians", [0, 1, 2, 3])
def test_numpy_stream_continues_exactly(gaussians: int) -> None:
    """Odd counts leave NumPy's legacy Gaussian cache full across batches."""

    def draws(loader: DataLoader | None) -> list[Any]:
        with torchrepro.isolated_rng():
            np.random.seed(1)
            batches = iter(loader) if loader is not None else None
            out: list[Any] = []
            for _ in range(3):
                out += [np.random.randn(gaussians), np.random.get_state()[3]]
                if batches is not None:
                    next(batches)
            return [*out, np.random.randn(3)]

    loader = DataLoader(Gaussians(), batch_size=BATCH, seed=3)
    for a, b in zip(draws(None), draws(loader), strict=True):
        assert np.array_equal(a, b)
