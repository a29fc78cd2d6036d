"""state_dict / load_state_dict: resume mid-epoch, anywhere, in any process, without replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from torchrepro.data import DataLoader

pytestmark = pytest.mark.usefixtures("each_loader_first")  # loaders stand for separate runs

N, BATCH, SEED = 11, 2, 5
PER_EPOCH = -(-N // BATCH)  # 6 batches, the last one partial


class Indexed(Dataset[dict[str, torch.Tensor]]):
    """Returns the index and a random draw; counts the loads made in this process."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.loaded.append(i)
        return {"index": torch.tensor(i), "noise": torch.rand(2)}


def _loader(workers: int = 0, dataset: Dataset[Any] | None = None, **kwargs: Any) -> DataLoader:
    if workers:
        kwargs.setdefault("multiprocessing_context", "fork")
    return DataLoader(
        dataset if dataset is not None else Indexed(),
        batch_size=BATCH,
        shuffle=True,
        seed=SEED,
        num_workers=workers,
        **kwargs,
    )


def _until_epoch(loader: DataLoader, epoch: int) -> list[dict[str, torch.Tensor]]:
    """Every batch the loader yields until it reaches ``epoch``."""
    out: list[dict[str, torch.Tensor]] = []
    while loader.epoch < epoch:
        out += list(loader)
    return out


def _assert_batches_equal(
    a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]
) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["noise"], y["noise"])


@pytest.fixture(scope="module")
def reference() -> list[dict[str, torch.Tensor]]:
    return _until_epoch(_loader(), 2)


class Taken(list[Any]):
    """Batches taken, and the iterator of the last pass: a state saved while it is alive
    is saved inside the loop, mid-pass (a pass broken off, its iterator gone, is over)."""

    iterator: Any = None


def _take(loader: DataLoader, count: int) -> Taken:
    out = Taken()
    while len(out) < count:
        out.iterator = iter(loader)
        for batch in out.iterator:
            out.append(batch)
            if len(out) == count:
                break
    return out


POSITIONS = [0, 1, 3, PER_EPOCH - 1, PER_EPOCH, PER_EPOCH + 2]


@pytest.mark.parametrize("before", [0, 2])
@pytest.mark.parametrize("after", [0, 2])
@pytest.mark.parametrize("position", POSITIONS)
def test_resume_matches_uninterrupted(
    reference: list[dict[str, torch.Tensor]], position: int, before: int, after: int
) -> None:
    first = _loader(before)
    taken = _take(first, position)
    _assert_batches_equal(taken, reference[:position])
    state = first.state_dict()
    assert (state["epoch"], state["batches_received"]) == divmod(position, PER_EPOCH)
    resumed = _loader(after)
    resumed.load_state_dict(state)
    _assert_batches_equal(_until_epoch(resumed, 2), reference[position:])


@pytest.mark.parametrize("persistent", [False, True])
def test_second_resume_in_the_same_epoch(
    reference: list[dict[str, torch.Tensor]], persistent: bool
) -> None:
    first = _loader(2, persistent_workers=persistent)
    taken = _take(first, 1)
    second = _loader(0)
    second.load_state_dict(first.state_dict())
    taken = _take(second, 2)
    _assert_batches_equal(taken, reference[1:3])
    third = _loader(2, persistent_workers=persistent)
    third.load_state_dict(second.state_dict())
    _assert_batches_equal(_until_epoch(third, 2), reference[3:])


def test_prefetched_batches_do_not_count(reference: list[dict[str, torch.Tensor]]) -> None:
    loader = _loader(2, prefetch_factor=4)  # workers load far ahead of the caller
    it = iter(loader)
    next(it)
    assert loader.state_dict()["batches_received"] == 1
    resumed = _loader(0)
    resumed.load_state_dict(loader.state_dict())
    _assert_batches_equal(list(resumed), reference[1:PER_EPOCH])
    assert resumed.epoch == 1


def test_skipped_samples_are_not_loaded() -> None:
    dataset = Indexed(1000)
    loader = DataLoader(dataset, batch_size=10, shuffle=True, seed=SEED)
    state = loader.state_dict()
    state.update(batches_received=90, samples_consumed=900)
    loader.load_state_dict(state)
    batch = next(iter(loader))
    assert dataset.loaded == batch["index"].tolist()
    assert len(dataset.loaded) == 10


def test_state_survives_json_and_weights_only(
    tmp_path: Path, reference: list[dict[str, torch.Tensor]]
) -> None:
    loader = _loader()
    taken = _take(loader, 3)  # noqa: F841 (its pass stays open)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    torch.save(state, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True) == state
    resumed = _loader(2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    _assert_batches_equal(_until_epoch(resumed, 2), reference[3:])


def test_resume_in_a_fresh_process(
    tmp_path: Path, run_python: Any, reference: list[dict[str, torch.Tensor]]
) -> None:
    loader = _loader()
    taken = _take(loader, 4)  # noqa: F841 (its pass stays open)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_data_resume import _loader, _until_epoch
loader = _loader(2, persistent_workers=True)
loader.load_state_dict(torch.load("state.pt", weights_only=True))
torch.save(_until_epoch(loader, 2), "rest.pt")
"""
    run_python(code)
    rest = torch.load(tmp_path / "rest.pt", weights_only=True)
    _assert_batches_equal(rest, reference[4:])


def test_set_epoch_and_automatic_epochs(reference: list[dict[str, torch.Tensor]]) -> None:
    loader = _loader()
    assert loader.epoch == 0
    list(loader)
    assert loader.epoch == 1
    loader.set_epoch(1)
    _assert_batches_equal(list(loader), reference[PER_EPOCH:])
    loader.set_epoch(0)
    _assert_batches_equal(list(loader), reference[:PER_EPOCH])


def test_world_size_change_needs_strict_false() -> None:
    loader = _loader()
    taken = _take(loader, 3)  # noqa: F841 (its pass stays open)
    state = loader.state_dict()
    state["world_size"] = 2
    resumed = _loader()
    with pytest.raises(ValueError, match=r"world_size=2.*world_size=1.*strict=False"):
        resumed.load_state_dict(state)
    resumed.load_state_dict(state, strict=False)  # from the global sample position
    assert resumed.state_dict()["batches_received"] == 3


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    batch=st.integers(1, 7),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    position=st.integers(0, 50),
    epoch=st.integers(0, 3),
)
def test_state_round_trip(
    n: int, batch: int, drop_last: bool, shuffle: bool, position: int, epoch: int
) -> None:
    def make() -> DataLoader:
        return DataLoader(
            list(range(n)), batch_size=batch, shuffle=shuffle, drop_last=drop_last, seed=1
        )

    loader = make()
    loader.set_epoch(epoch)
    batches = _take(loader, min(position, len(loader)))
    taken = [b.tolist() for b in batches]
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    rest = [b.tolist() for b in resumed] if resumed.epoch == epoch else []
    fresh = make()
    fresh.set_epoch(epoch)
    assert taken + rest == [b.tolist() for b in fresh]


GOOD: dict[str, Any] = {
    "version": 1,
    "kind": "map",
    "seed": SEED,
    "epoch": 0,
    "batches_received": 2,
    "samples_consumed": 4,
    "dataset_length": N,
    "batch_size": BATCH,
    "drop_last": False,
    "shuffle": True,
    "world_size": 1,
}

BAD = [
    ({"version": 2}, ValueError, r"'version' must be 1, got 2"),
    ({"kind": "iterable"}, ValueError, r"'kind' must be 'map'"),
    ({"extra": 1}, ValueError, r"unknown key\(s\) \['extra'\]"),
    ({"seed": 6}, ValueError, r"made for seed=6, but this loader has seed=5"),
    ({"seed": -1}, ValueError, r"'seed' must be an int in \[0, "),
    ({"epoch": -1}, ValueError, r"'epoch' must be an int in \[0, 18446744073709551615\], got -1"),
    ({"epoch": "1"}, TypeError, r"'epoch' must be an int, got str '1'"),
    ({"epoch": True}, TypeError, r"'epoch' must be an int, got bool"),
    (
        {"batches_received": -1},
        ValueError,
        r"'batches_received' must be an int in \[0, 6\], got -1",
    ),
    ({"batches_received": 7}, ValueError, r"'batches_received' must be an int in \[0, 6\], got 7"),
    (
        {"samples_consumed": 5},
        ValueError,
        r"'samples_consumed' must be 4 for batches_received=2, got 5",
    ),
    ({"samples_consumed": 12}, ValueError, r"'samples_consumed' must be an int in \[0, 11\]"),
    (
        {"dataset_length": 12},
        ValueError,
        r"dataset_length=12, but this loader has dataset_length=11",
    ),
    ({"batch_size": 3}, ValueError, r"batch_size=3, but this loader has batch_size=2"),
    ({"batch_size": 2.0}, TypeError, r"'batch_size' must be an int, got float"),
    ({"drop_last": True}, ValueError, r"drop_last=True, but this loader has drop_last=False"),
    ({"drop_last": 0}, TypeError, r"'drop_last' must be a bool, got int"),
    ({"shuffle": False}, ValueError, r"shuffle=False, but this loader has shuffle=True"),
    ({"world_size": 0}, ValueError, r"'world_size' must be an int >= 1, got 0"),
    ({"stream": "created:x"}, ValueError, r"'stream' must be a string 'created:<k>' or 'gen"),
    ({"stream": 1}, ValueError, r"'stream' must be a string 'created:<k>'.*got 1"),
    ({"permutation": "x"}, ValueError, r"'permutation' must be 'feistel' or 'randperm', got 'x'"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD)
def test_bad_states_are_refused(change: dict[str, Any], error: type[Exception], match: str) -> None:
    loader = _loader()
    loader.load_state_dict(GOOD)  # the baseline is valid
    with pytest.raises(error, match=match):
        loader.load_state_dict({**GOOD, **change})
    # A refused state changes nothing; a state without a stream key is the first loader's.
    assert loader.state_dict() == {**GOOD, "stream": "created:0", "permutation": "randperm"}


def test_missing_key_and_non_dict_are_refused() -> None:
    loader = _loader()
    state = dict(GOOD)
    del state["epoch"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['epoch'\]"):
        loader.load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        loader.load_state_dict([1, 2])  # type: ignore[arg-type]
