"""The sample order: torchrepro's own global permutation, or a user's sampler, per epoch.

**Own order.** Epoch ``e`` reads a permutation ``perm_e`` of ``range(n)`` (the identity
without shuffling) that does not depend on the world size: ``"feistel"`` (new loaders), a
keyed bijection computed at the positions read, O(1) time and memory per sample whatever
``n`` (``_shuffle.py``, keyed by ``derive_words(seed, "feistel", e)``); or ``"randperm"``
(loaders resumed from a state saved before it existed), ``randperm(n)`` drawn from a
private generator seeded with ``derive_seed(seed, "shuffle", e)``, O(n) per epoch. Global batch ``g`` is
``perm_e[g*B*W:(g+1)*B*W]`` for batch size ``B`` and world size ``W``, and rank ``r``
takes its slice ``[r*B:(r+1)*B]``. A last, partial global batch of ``m`` samples is
dropped whole with ``drop_last``; otherwise it is padded to ``ceil(m/W)*W`` samples by
wrapping to the start of the permutation and split evenly, so every rank gets the same
number of batches. With ``W == 1`` this is plain batching of ``perm_e``. The dataset
length, rank and world size are read when an iteration starts.

**A user's sampler or batch sampler** runs in the main process inside its own RNG
context: at the start of epoch ``e`` the global RNGs it may draw from (``random``,
NumPy, torch) are seeded from ``(seed, "sampler", e)``, a ``generator`` attribute it
holds (torch's samplers) is reseeded with ``derive_seed(seed, "sampler", e)``, and
``set_epoch(e)`` is called when it has one; every pull from it runs between a save and a
restore of the caller's RNGs. Its order is therefore a function of (seed, epoch) — for a
sampler whose order depends only on those draws and ``set_epoch`` (not on state kept from
one ``iter()`` to the next) — and a resume replays it, skipping the batches already
received without loading them.

Batches travel to the loading process as :class:`KeyBatch`: a list of the indices the
dataset expects, carrying the epoch and how each sample is seeded.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch.utils.data import Sampler

from .._errors import TorchreproError
from ..core._seed import derive_seed
from ._isolate import check_thread, restore_globals, save_globals
from ._keys import OWN, STREAM, KeyBatch, make_batch
from ._seeding import _clear_current, _Seeder
from ._shuffle import Feistel

FEISTEL = "feistel"  # the order of new loaders
RANDPERM = "randperm"  # the order before FEISTEL: a state without "permutation" names it

_CHUNK = 8192  # sample positions converted to Python ints at a time
_FEISTEL_CHUNK = 512  # ... and computed at a time by the Feistel order


class Order:
    """Which samples each rank reads in each epoch, from which batch on (own order)."""

    def __init__(
        self,
        *,
        length: int,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        algorithm: str = FEISTEL,
    ) -> None:
        self.algorithm = algorithm  # FEISTEL or RANDPERM
        self.length = length
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self._cached: tuple[int, int, torch.Tensor] | None = None
        self._feistel: Feistel | None = None

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._cached = self._feistel = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        """Batches each rank receives per epoch (the same on every rank)."""
        full, rest = divmod(self.length, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def samples_per_rank(self) -> int:
        full, rest = divmod(self.length, self.global_batch)
        tail = 0 if self.drop_last or not rest else -(-rest // self.world_size)
        return full * self.batch_size + tail

    def samples_consumed(self, batches: int) -> int:
        """Samples of the global order consumed after ``batches`` global batches."""
        return min(batches * self.global_batch, self.length)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The whole ``randperm`` permutation of ``epoch`` (the RANDPERM algorithm)."""
        cached = self._cached
        if cached is not None and cached[0] == epoch and cached[1] == self.length:
            return cached[2]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", epoch))
        perm = torch.randperm(self.length, generator=gen)
        self._cached = (epoch, self.length, perm)
        return perm

    def _lookup(self, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map from positions of the epoch's global order to dataset indices."""
        if not self.shuffle:
            return lambda positions: positions
        if self.algorithm == RANDPERM:
            perm = self.permutation(epoch)
            return lambda positions: perm[positions]
        feistel = self._feistel
        if feistel is None or (feistel.n, feistel.epoch) != (self.length, epoch):
            feistel = self._feistel = Feistel(self.length, self.seed, epoch)
        return feistel

    def indices(self, epoch: int, start_batch: int) -> Iterator[int]:
        """This rank's indices from batch ``start_batch`` to the epoch's end.

        Costs nothing per skipped sample; O(n) once for RANDPERM, O(1) per index otherwise.
        """
        n, b, w, r = self.length, self.batch_size, self.world_size, self.rank
        if n == 0:
            return
        at = self._lookup(epoch)
        full = n // self.global_batch
        offsets = torch.arange(r * b, (r + 1) * b)
        # Feistel indices cost per position: a small chunk keeps the first batch quick.
        chunk = _CHUNK if not self.shuffle or self.algorithm == RANDPERM else _FEISTEL_CHUNK
        step = max(1, chunk // b)
        for first in range(start_batch, full, step):
            rows = torch.arange(first, min(first + step, full))[:, None] * self.global_batch
            yield from at((rows + offsets).reshape(-1)).tolist()
        rest = n - full * self.global_batch
        if rest and not self.drop_last and start_batch <= full:
            per_rank = -(-rest // w)
            begin = full * self.global_batch + r * per_rank
            yield from at(torch.arange(begin, begin + per_rank) % n).tolist()

    def batches(self, epoch: int, start_batch: int, unbatched: bool) -> Iterator[KeyBatch]:
        """This rank's batches from ``start_batch`` on, as :class:`KeyBatch` es."""
        size = 1 if unbatched else self.batch_size
        it = self.indices(epoch, start_batch)
        while True:
            items = list(itertools.islice(it, size))
            if not items:
                return
            yield make_batch(items, epoch, OWN, self.rank, 0, unbatched)


# --- who may iterate the public samplers ------------------------------------------------

_driving = threading.local()


def _caller() -> str:
    """The first frame outside torch.utils.data and torchrepro: who iterated us."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        if not module.startswith(("torch.utils.data", "torchrepro.data")):
            return f"{module}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        frame = frame.f_back  # type: ignore[assignment]
    return "unknown code"


def _driving_epoch() -> int | None:
    """The epoch of the torchrepro loader pulling from a sampler in this thread, if any."""
    stack: list[int] = getattr(_driving, "epochs", [])
    return stack[-1] if stack else None


def _framework_hint(caller: str) -> str:
    """What to use instead, for a framework known to rebuild loaders (said in its words)."""
    if caller.startswith("accelerate"):
        return (
            " (accelerate's Accelerator.prepare rebuilt the loader: use "
            "torchrepro.integrations.accelerate.ReproAccelerator, whose prepare() keeps the "
            "torchrepro.DataLoader)"
        )
    return ""


def _refuse_foreign(what: str) -> None:
    if _driving_epoch() is not None:
        return
    caller = _caller()
    raise TorchreproError(
        f"{what} of a torchrepro.DataLoader was iterated by {caller}, which rebuilds the "
        f"loader from its attributes{_framework_hint(caller)}: the rebuilt loader would hand the samples to the "
        "dataset without torchrepro's per-sample seeding, so its augmentation would depend "
        "on num_workers and its order could not be resumed. Iterate the torchrepro.DataLoader "
        "itself, or rebuild it as torchrepro.DataLoader(...), which accepts sampler= and "
        "batch_sampler=."
    )


class _Driving:
    """Marks pulls from a user's sampler made by a torchrepro loader (this thread)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __enter__(self) -> None:
        if not hasattr(_driving, "epochs"):
            _driving.epochs = []
        _driving.epochs.append(self.epoch)

    def __exit__(self, *exc: object) -> None:
        _driving.epochs.pop()


class _OwnedByLoader:
    """Holds its loader weakly (no cycle keeps persistent workers alive); pickles it strongly."""

    _loader: Callable[[], Any]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loader"] = self._loader()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        loader = state.pop("_loader")
        self.__dict__.update(state)
        self._loader = weakref.ref(loader) if loader is not None else lambda: None


class KeySampler(_OwnedByLoader, Sampler[int]):
    """``loader.sampler`` for torchrepro's own order: this rank's indices of the current epoch.

    Only a torchrepro loader may iterate it (a framework rebuilding a plain DataLoader
    from it gets a :class:`TorchreproError`). Another torchrepro loader that wraps it in a
    sampler of its own (Lightning's DistributedSamplerWrapper) reads the whole global order
    of that loader's epoch, which the wrapper then splits. ``set_epoch`` forwards to the
    loader, so frameworks that call ``loader.sampler.set_epoch(e)`` set the loader's epoch.
    """

    def __init__(self, loader: Any, shuffle: bool) -> None:
        self._loader = weakref.ref(loader)
        self.shuffle = shuffle

    def _owner(self) -> Any:
        loader = self._loader()
        if loader is None:
            caller = _caller()
            raise TorchreproError(
                f"the torchrepro.DataLoader this sampler belongs to is gone, and {caller} uses "
                f"the sampler in a loader rebuilt from its attributes{_framework_hint(caller)}: "
                "iterate the torchrepro.DataLoader itself, so batches keep its per-sample "
                "seeding and resumable position"
            )
        return loader

    def __iter__(self) -> Iterator[int]:
        _refuse_foreign("loader.sampler")
        order = self._owner()._repro_order()
        epoch = cast(int, _driving_epoch())
        whole = Order(
            length=order.length,
            batch_size=order.batch_size,
            drop_last=order.drop_last,
            shuffle=order.shuffle,
            seed=order.seed,
            algorithm=order.algorithm,
        )
        return whole.indices(epoch, 0)

    def __len__(self) -> int:
        return int(self._owner()._repro_order().samples_per_rank())

    def set_epoch(self, epoch: int) -> None:
        self._owner().set_epoch(epoch)


class Guarded(_OwnedByLoader, Sampler[Any]):
    """``loader.sampler``/``loader.batch_sampler`` for a user's sampler: iterable only by a
    torchrepro loader; other attributes are the user's sampler's (``.sampler`` itself is
    the user's object when the user's has none)."""

    def __init__(self, source: Any, loader: Any, what: str) -> None:
        self.source = source
        self._loader = weakref.ref(loader)
        self._what = what

    def __iter__(self) -> Iterator[Any]:
        _refuse_foreign(self._what)
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("source", "_loader", "_what"):
            raise AttributeError(name)
        return getattr(self.source, name)


# --- a user's sampler ----------------------------------------------------------------------


def _generators(source: Any) -> list[torch.Generator]:
    """The torch generators a sampler (or the sampler inside a batch sampler) holds."""
    found: list[torch.Generator] = []
    for obj in (source, getattr(source, "sampler", None)):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _set_epoch(source: Any, epoch: int) -> None:
    done: list[Any] = []
    for obj in (source, getattr(source, "sampler", None)):
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch) and all(obj is not d for d in done):
            set_epoch(epoch)
            done.append(obj)


class UserOrder:
    """A user's sampler (grouped into batches of ``batch_size``) or batch sampler, replayed
    per epoch inside its own seeded RNG context."""

    def __init__(
        self,
        *,
        source: Iterable[Any],
        batched: bool,
        batch_size: int | None,
        drop_last: bool,
        seed: int,
    ) -> None:
        self.source = source
        self.batched = batched  # source is a batch sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self._seeder = _Seeder(seed, "sampler")

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._seeder = _Seeder(seed, "sampler")

    def batches_per_epoch(self) -> int:
        n = len(self.source)  # type: ignore[arg-type]
        if self.batched or self.batch_size is None:
            return int(n)
        return int(n // self.batch_size if self.drop_last else -(-n // self.batch_size))

    def _pull(self, it: Iterator[Any]) -> list[Any] | None:
        if self.batched:
            try:
                return list(next(it))
            except StopIteration:
                return None
        size = 1 if self.batch_size is None else self.batch_size
        items = list(itertools.islice(it, size))
        if not items or (len(items) < size and self.drop_last):
            return None
        return items

    def batches(self, epoch: int, start_batch: int, rank: int) -> Iterator[KeyBatch]:
        """Batches of ``epoch`` from ``start_batch`` on; the skipped ones are drawn, not loaded."""
        check_thread("the sampler")
        caller = save_globals()
        try:
            with _Driving(epoch):
                self._seeder.seed_globals(epoch)
                _clear_current()
                word = derive_seed(self.seed, "sampler", epoch)
                for gen in _generators(self.source):
                    gen.manual_seed(word)
                _set_epoch(self.source, epoch)
                it = iter(self.source)
                position = 0
                for _ in range(start_batch):
                    items = self._pull(it)
                    if items is None:
                        break
                    position += len(items)
            context = save_globals()
        finally:
            restore_globals(caller)
        unbatched = self.batch_size is None and not self.batched
        while True:
            check_thread("the sampler")
            caller = save_globals()
            try:
                restore_globals(context)
                with _Driving(epoch):
                    items = self._pull(it)
                context = save_globals()
            finally:
                restore_globals(caller)
            if items is None:
                return
            yield make_batch(items, epoch, STREAM, rank, position, unbatched)
            position += len(items)
