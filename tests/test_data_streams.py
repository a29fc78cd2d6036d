"""Every loader of a process is its own stream, keyed reproducibly (issue 28, part 1)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from torchrepro import TorchreproWarning
from torchrepro.data import DataLoader, _streams

SEED = 3


class Noisy(Dataset[torch.Tensor]):
    """Row ``[index, draw]``: the order and the per-sample randomness, both visible."""

    def __init__(self, n: int, sign: float = 1.0) -> None:
        self.n, self.sign = n, sign

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.cat([torch.tensor([float(i)]), self.sign * torch.rand(1)])


def _rows(loader: DataLoader, epochs: int = 1) -> torch.Tensor:
    return torch.cat([torch.cat(list(loader)) for _ in range(epochs)])


def _draws_by_index(rows: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    return (sign * rows[:, 1])[rows[:, 0].long().argsort()]


def test_two_loaders_over_different_datasets_are_independent() -> None:
    n = 3000
    a = DataLoader(Noisy(n), batch_size=50, shuffle=True, seed=SEED)
    b = DataLoader(Noisy(n, sign=-1.0), batch_size=50, shuffle=True, seed=SEED)
    assert (a.stream, b.stream) == ("created:0", "created:1")
    rows_a, rows_b = _rows(a), _rows(b)
    # Positions holding the same index: ~1 by chance (Poisson(1): > 15 has p ~ 1e-13).
    assert int((rows_a[:, 0] == rows_b[:, 0]).sum()) <= 15
    # Per-sample draws of the same index: equal only by a float32 collision (p ~ 2e-4 each).
    same = _draws_by_index(rows_a) == _draws_by_index(rows_b, sign=-1.0)
    assert int(same.sum()) <= 2


def test_the_first_loader_of_a_process_draws_the_streams_of_before_keys() -> None:
    # Recorded with torchrepro at c16efdc (before stream keys): (index, draw) of 2 epochs.
    before = [
        (2, 0.4762704372406006), (7, 0.0472869873046875), (1, 0.35262060165405273),
        (0, 0.2949962615966797), (4, 0.17605829238891602), (5, 0.7464815974235535),
        (6, 0.17356491088867188), (8, 0.4573119878768921), (3, 0.34083545207977295),
        (9, 0.43658947944641113), (7, 0.5634385943412781), (2, 0.9423536062240601),
        (4, 0.6351071000099182), (5, 0.757412850856781), (0, 0.6181836128234863),
        (3, 0.33337098360061646), (8, 0.27819836139678955), (9, 0.46901935338974),
        (1, 0.5590692758560181), (6, 0.4506927728652954),
    ]  # fmt: skip
    expected = torch.tensor([[float(i), d] for i, d in before])
    first = DataLoader(Noisy(10), batch_size=4, shuffle=True, seed=SEED)
    assert first.stream == "created:0"  # the suite starts each test as a fresh process
    rows = _rows(first, 2)
    # Its per-sample randomness is the same; its order is the new one (see CHANGELOG.md).
    for epoch in range(2):
        mine, old = rows[10 * epoch : 10 * epoch + 10], expected[10 * epoch : 10 * epoch + 10]
        assert torch.equal(_draws_by_index(mine), _draws_by_index(old))
    assert not torch.equal(rows[:, 0], expected[:, 0])
    # A state saved before keys and the new order existed (no "stream", no "permutation")
    # resumes exactly that run, order included, in any loader.
    second = DataLoader(Noisy(10), batch_size=4, shuffle=True, seed=SEED)
    state = first.state_dict()
    for key in ("stream", "permutation"):
        del state[key]
    state["epoch"] = 0
    second.load_state_dict(state)
    assert second.stream == "created:0"
    assert torch.equal(_rows(second, 2), expected)


def _with_generator(seed: int | None, sign: float = 1.0) -> DataLoader:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    data = Noisy(40, sign)
    return DataLoader(data, batch_size=8, shuffle=True, seed=SEED, generator=generator)


def test_generators_of_the_same_seed_share_a_stream() -> None:
    a, b = _with_generator(7), _with_generator(7, sign=-1.0)
    assert a.stream == b.stream == "generator:7"
    rows_a, rows_b = _rows(a, 2), _rows(b, 2)
    assert torch.equal(rows_a[:, 0], rows_b[:, 0])
    assert torch.equal(_draws_by_index(rows_a[:40]), _draws_by_index(rows_b[:40], sign=-1.0))
    other = _rows(_with_generator(8), 2)
    assert not torch.equal(rows_a[:, 0], other[:, 0])
    assert not torch.equal(rows_a[:, 1], other[:, 1])
    # A generator does not take a place in creation order.
    assert _with_generator(None).stream == "created:0"


def test_a_generator_must_be_a_torch_generator() -> None:
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        DataLoader(Noisy(4), seed=0, generator=7)  # type: ignore[arg-type]


@pytest.mark.parametrize("via", ["sampler", "batch_sampler"])
def test_a_loader_rebuilt_from_another_inherits_its_stream(via: str) -> None:
    DataLoader(Noisy(12), batch_size=3, shuffle=True, seed=SEED)  # takes created:0
    original = DataLoader(Noisy(12), batch_size=3, shuffle=True, seed=SEED)
    kwargs: dict[str, Any] = (
        {"batch_sampler": original.batch_sampler}
        if via == "batch_sampler"
        else {"sampler": original.sampler, "batch_size": 3}
    )
    rebuilt = DataLoader(original.dataset, seed=SEED, **kwargs)  # Lightning's re-creation
    assert rebuilt.stream == original.stream == "created:1"
    assert torch.equal(_rows(rebuilt, 2), _rows(original, 2))
    assert DataLoader(Noisy(12), seed=SEED).stream == "created:2"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_each_stream_whatever_the_creation_order(workers: int) -> None:
    def loaders(first: str) -> dict[str, DataLoader]:
        _streams.reset_created()  # each run of the script is a fresh process
        built = {}
        for name in (first, "b" if first == "a" else "a"):
            sign = -1.0 if name == "b" else 1.0
            built[name] = DataLoader(
                Noisy(20, sign), batch_size=3, shuffle=True, seed=SEED, num_workers=workers
            )
        return built

    def run(built: dict[str, DataLoader], steps: int | None) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        its = {name: iter(loader) for name, loader in built.items()}
        live.append(its)  # stopped at ``steps`` inside the pass: its iterators stay alive
        while steps is None or len(out) < 2 * steps:
            try:
                pair = [next(its["a"]), next(its["b"])]
            except StopIteration:
                if built["a"].epoch >= 2:
                    return out
                its = {name: iter(loader) for name, loader in built.items()}
                continue
            out.extend(pair)
        return out

    live: list[Any] = []
    reference = run(loaders("a"), None)
    interrupted = loaders("a")
    head = run(interrupted, 4)
    states = {name: loader.state_dict() for name, loader in interrupted.items()}
    resumed = loaders("b")  # the script now builds b first: creation order is swapped
    for name, loader in resumed.items():
        assert loader.stream != interrupted[name].stream  # until the state is loaded
        loader.load_state_dict(states[name])
        assert loader.stream == interrupted[name].stream
    tail = run(resumed, None)
    assert len(head) + len(tail) == len(reference)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, reference, strict=True))


# --- a loader built anew over a dataset read before (issue 28, part 2) ---------------


def test_a_loader_built_anew_over_a_dataset_read_before_warns() -> None:
    dataset = Noisy(12)

    def train_one_epoch() -> torch.Tensor:
        return _rows(DataLoader(dataset, batch_size=3, shuffle=True, seed=SEED))

    first = train_one_epoch()
    with pytest.warns(TorchreproWarning, match=r"own stream \('created:1'\).*set_epoch\(epoch\)"):
        second = train_one_epoch()
    assert not torch.equal(first, second)  # its own stream: not a replay of epoch 0
    items = list(range(6))  # a list cannot be weakly referenced: found through its loader
    keep = DataLoader(items, batch_size=2, seed=SEED)
    _rows(keep)
    with pytest.warns(TorchreproWarning, match="set_epoch"):
        DataLoader(items, batch_size=2, seed=SEED)


def test_a_rebuild_from_a_loaders_samplers_does_not_warn() -> None:
    loader = DataLoader(Noisy(12), batch_size=3, shuffle=True, seed=SEED)
    _rows(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, seed=SEED)


class _EqualByContent(Dataset[int]):
    """A dataset whose equality is by content and elementwise, as a tensor's is."""

    def __init__(self) -> None:
        self.values = torch.arange(8)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return int(self.values[i])

    def __eq__(self, other: object) -> Any:
        return self.values == getattr(other, "values", None)

    __hash__ = object.__hash__


@pytest.mark.parametrize("make", [lambda: torch.arange(16.0).reshape(8, 2), _EqualByContent])
def test_datasets_read_are_known_by_identity_not_by_their_equality(make: Any) -> None:
    # A tensor used as a dataset (Lightning users pass one) compares elementwise: the
    # loader must never ask a dataset whether it equals another.
    first, other = make(), make()
    for dataset in (first, other):
        list(DataLoader(dataset, batch_size=4, shuffle=True, seed=0))
    with pytest.warns(TorchreproWarning, match="already read"):
        list(DataLoader(first, batch_size=4, shuffle=True, seed=0))
