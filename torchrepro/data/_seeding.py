"""Per-sample seeding of the global RNGs, wherever ``dataset[i]`` runs.

Before each sample, Python ``random``, NumPy's global RNG and torch's CPU default
generator are seeded from ``derive_words(seed, "sample", epoch, index, words=4)``: one
BLAKE2b call gives the sample's seed and the three streams' seeds. The cheapest seeding
call of each library is used (about 8 us per sample in all):

- ``random``: the C-level ``seed`` of the module's instance (the same stream as
  ``random.seed(word)``);
- NumPy: ``np.random.seed(word & 0xFFFFFFFF)``, the fast 32-bit path (2 us, against
  10 us for the full 64 bits). The NumPy stream therefore has 2**32 possible starts;
  streams of samples are independent otherwise, but among ~10**5 samples a pair may
  share its NumPy stream (birthday bound). ``random`` keeps 64 bits;
- torch: ``torch.default_generator.manual_seed`` (1 us; ``torch.manual_seed`` also
  seeds every accelerator and takes ~150 us), with the word's low 63 bits so that
  ``torch.initial_seed()`` stays in torch's int64 range. When CUDA is already initialised
  in the loading process (a dataset drawing on the GPU with ``num_workers=0``), every
  CUDA default generator is seeded with the same word, so those draws are per-sample too
  and, with the main process's states restored after each batch, do not consume the
  training loop's CUDA stream. CUDA is never initialised by torchrepro.

Samples of torchrepro's own order are seeded from ``(seed, "sample", epoch, index)``,
samples drawn from a user's sampler from ``(seed, "stream", epoch, rank, position)``
(so a sampler drawing with replacement gives each draw its own stream). A dataset with
``__getitems__`` is called once per batch, with the streams of the batch's first sample.
"""

from __future__ import annotations

import _random
import hashlib
import random
import struct
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .._errors import TorchreproError
from ..core._rng import _numpy
from ..core._seed import _PERSON, _encode
from ._keys import OWN, KeyBatch

__all__ = ["sample_seed"]

_MASK32 = 0xFFFFFFFF
_MASK63 = 2**63 - 1
_unpack4 = struct.Struct("<4Q").unpack
_blake2b = hashlib.blake2b
_c_seed = _random.Random.seed  # the C seeding under random.seed(), without its Python wrapper
_py_inst: Any = random._inst  # type: ignore[attr-defined]
_torch_gen = torch.default_generator

# The seed of the sample being loaded in this process, or None outside ``dataset[i]``.
_current: int | None = None


def sample_seed() -> int:
    """The 64-bit seed of the sample being loaded, for code that keeps its own generators.

    Call it inside the ``__getitem__`` (or ``__iter__``) of a dataset read by
    :class:`torchrepro.DataLoader`, in whatever process runs it. It is a pure function
    of (seed, epoch, sample index), like the global RNG streams seeded for the sample.

    Returns:
        An int in ``[0, 2**64 - 1]``.

    Raises:
        TorchreproError: called outside a sample load of a torchrepro DataLoader.

    >>> import torch
    >>> from torchrepro.data import DataLoader, sample_seed
    >>> class Data(torch.utils.data.Dataset):
    ...     def __len__(self): return 2
    ...     def __getitem__(self, i): return sample_seed()
    >>> seeds = list(DataLoader(Data(), batch_size=None, seed=0))
    >>> len(set(seeds)) == 2 and all(0 <= s < 2**64 for s in seeds)
    True
    """
    if _current is None:
        raise TorchreproError(
            "sample_seed() was called outside a sample load: call it inside the "
            "__getitem__ (or __iter__) of a dataset read by torchrepro.DataLoader"
        )
    return _current


class _Seeder:
    """Derives the words for a key and seeds the three global RNGs; picklable."""

    def __init__(self, seed: int, purpose: str) -> None:
        self.seed = seed
        self.purpose = purpose
        self._setup()

    def _setup(self) -> None:
        self._prefix = _encode((self.seed, self.purpose))
        np = _numpy()
        self._np_seed = np.random.seed if np is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "purpose": self.purpose}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.purpose = state["purpose"]
        self._setup()

    def words(self, *path: int) -> tuple[int, int, int, int]:
        # Equal to derive_words(seed, purpose, *path, words=4) for ints in [0, 2**64);
        # inlined for speed (0.9 us against 2.8 us).
        data = self._prefix + b"".join([b"i" + p.to_bytes(8, "little") for p in path])
        return _unpack4(_blake2b(data, digest_size=32, person=_PERSON).digest())  # type: ignore[return-value]

    def seed_globals(self, *path: int) -> None:
        """Seed ``random``, NumPy and torch CPU for ``path``; set the current sample seed."""
        global _current
        sample, py, np_word, torch_word = self.words(*path)
        _c_seed(_py_inst, py)
        _py_inst.gauss_next = None  # what random.seed() also resets
        if self._np_seed is not None:
            self._np_seed(np_word & _MASK32)
        _seed_torch(torch_word & _MASK63)
        _current = sample


def _own_getitems(dataset: Any) -> bool:
    """Whether ``dataset`` has a batched ``__getitems__`` of its own (torch's Subset and
    StackDataset define one that only forwards: those keep per-sample seeding)."""
    method = getattr(type(dataset), "__getitems__", None)
    return bool(method) and getattr(method, "__module__", "") != "torch.utils.data.dataset"


def _seed_torch(word: int) -> None:
    _torch_gen.manual_seed(word)
    if _cuda_initialized():
        for gen in torch.cuda.default_generators:
            gen.manual_seed(word)


_cuda_initialized = torch.cuda.is_initialized


def _clear_current() -> None:
    global _current
    _current = None


class MapWrapper(Dataset[Any]):
    """What the loading process reads: ``wrapper.__getitems__(batch)`` seeds each sample of
    a :class:`KeyBatch` and returns ``[dataset[i] for i in batch]`` (one call to the
    dataset's own ``__getitems__`` when it has one)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self._own = _Seeder(seed, "sample")
        self._stream = _Seeder(seed, "stream")
        self._batched = _own_getitems(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("torchrepro's dataset wrapper is read in batches only")  # pragma: no cover

    def __getitems__(self, batch: KeyBatch) -> list[Any]:
        global _current
        dataset = self.dataset
        epoch = batch.epoch.to_bytes(8, "little")
        if batch.kind == OWN:
            prefix = self._own._prefix + b"i" + epoch + b"i"
            suffixes = [index.to_bytes(8, "little") for index in batch]
        else:
            prefix = self._stream._prefix + b"i" + epoch + b"i" + batch.rank.to_bytes(8, "little")
            prefix += b"i"
            suffixes = [
                p.to_bytes(8, "little") for p in range(batch.start, batch.start + len(batch))
            ]
        np_seed = self._own._np_seed
        getitems = dataset.__getitems__ if self._batched and not batch.unbatched else None
        try:
            if getitems:
                suffixes = suffixes[:1]
            out = []
            for index, suffix in zip(batch, suffixes, strict=False):
                # _Seeder.seed_globals, inlined: this runs once per sample.
                digest = _blake2b(prefix + suffix, digest_size=32, person=_PERSON).digest()
                sample, py, np_word, torch_word = _unpack4(digest)
                _c_seed(_py_inst, py)
                _py_inst.gauss_next = None
                if np_seed is not None:
                    np_seed(np_word & _MASK32)
                _seed_torch(torch_word & _MASK63)
                _current = sample
                if getitems:
                    return list(getitems(list(batch)))
                out.append(dataset[index])
            return out
        finally:
            _current = None


_EPOCH_OFFSET = 2**63  # epochs in [0, 2**64) stored in an int64 tensor


class IterableWrapper(IterableDataset[Any]):
    """Wraps an iterable dataset: item ``k`` of worker ``w`` in epoch ``e`` is seeded from
    ``(seed, "item", e, w, k)``; ``iter(dataset)`` itself from ``(seed, "iter", e, w)``.

    The loader sets the epoch and the first item's count before each iteration, in a
    tensor that :meth:`share` puts in shared memory, so persistent workers see them too.
    ``items`` counts what this process yielded (exact with num_workers=0). A dataset state
    given to :meth:`load_later` is loaded right after ``iter(dataset)`` (torchdata's order:
    loading it before would be undone by a dataset that resets itself in ``__iter__``).
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self._items = _Seeder(seed, "item")
        self._iters = _Seeder(seed, "iter")
        self._where = torch.zeros(2, dtype=torch.int64)  # epoch - 2**63, start item
        self.items = 0
        self.pending_state: Any = None

    def share(self) -> None:
        if not self._where.is_shared():
            self._where.share_memory_()

    def set_position(self, epoch: int, start_item: int) -> None:
        self._where[0] = epoch - _EPOCH_OFFSET
        self._where[1] = start_item

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch_word, count = self._where.tolist()
        epoch = epoch_word + _EPOCH_OFFSET
        self.items = count
        self._iters.seed_globals(epoch, worker)
        try:
            it = iter(self.dataset)
            if self.pending_state is not None:
                state, self.pending_state = self.pending_state, None
                self.dataset.load_state_dict(state)
        finally:
            _clear_current()
        return self._generate(it, epoch, worker, count)

    def _generate(self, it: Iterator[Any], epoch: int, worker: int, count: int) -> Iterator[Any]:
        while True:
            self._items.seed_globals(epoch, worker, count)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                _clear_current()
            count += 1
            self.items = count
            yield item


class Collate:
    """The user's ``collate_fn``; with ``batch_size=None``, applied to the single sample."""

    def __init__(self, collate_fn: Any, unbatched: bool) -> None:
        self.collate_fn = collate_fn
        self.unbatched = unbatched

    def __call__(self, data: list[Any]) -> Any:
        return self.collate_fn(data[0] if self.unbatched else data)


class WorkerInit:
    """torchrepro's ``worker_init_fn``: makes ``get_worker_info().dataset`` the user's
    dataset, seeds the worker's global RNGs from (seed, worker id) so that the user's
    ``worker_init_fn``, which runs next, draws reproducibly, then runs it."""

    def __init__(self, seed: int, user_fn: Any) -> None:
        self.seed = seed
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        wrapper = getattr(info, "dataset", None)
        if isinstance(wrapper, (MapWrapper, IterableWrapper)):
            # WorkerInfo is frozen; its dataset must be the user's (torch's sharding recipe
            # sets attributes on it), which the wrapper in this worker reads.
            object.__setattr__(info, "dataset", wrapper.dataset)
        _Seeder(self.seed, "worker").seed_globals(worker_id)
        _clear_current()
        if info is not None:  # the seed this worker really got, as torch documents it
            object.__setattr__(info, "seed", torch.initial_seed())
        if self.user_fn is not None:
            self.user_fn(worker_id)
