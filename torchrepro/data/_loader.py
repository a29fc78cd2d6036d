"""``torchrepro.DataLoader``: torch's DataLoader with per-sample seeding and a resumable order."""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch.utils.data import IterableDataset

from .. import _dist, _runinfo
from .._errors import TorchreproError, TorchreproWarning
from .._seed import derive_seed
from . import _state
from ._inspect import find_rngs
from ._isolate import LoaderIter
from ._options import check_arguments, resolve_seed, resolve_workers
from ._sampler import KeySampler, Order
from ._seeding import IterableWrapper, MapWrapper, WorkerInit

__all__ = ["DataLoader"]


class DataLoader(torch.utils.data.DataLoader[Any]):
    """torch's DataLoader whose output is a pure function of (seed, epoch, sample index).

    Before ``dataset[i]`` runs, in whatever process runs it, Python ``random``, NumPy's
    global RNG and torch's CPU generator are seeded from ``(seed, epoch, i)`` (see
    :func:`torchrepro.sample_seed`), so random augmentations do not depend on
    ``num_workers``, ``persistent_workers``, the start method, ``prefetch_factor`` or
    ``pin_memory``. The epoch's order is a permutation drawn from
    ``derive_seed(seed, "shuffle", epoch)``. The main process's global RNGs are never
    drawn from or left changed (with ``num_workers=0`` they are saved before and
    restored after each batch), so the training loop's randomness does not depend on
    data loading.

    Epochs advance by themselves: each ``iter()`` continues the current epoch, and once
    its last batch was received the next ``iter()`` starts the next epoch. A new
    ``iter()`` after the caller broke off mid-epoch continues where the caller stopped,
    so :meth:`state_dict` always describes what the next iteration yields.

    ``loader.dataset`` is the dataset given; workers load it through a seeding wrapper.
    A ``collate_fn`` that draws randomness continues the streams of the batch's last
    sample, so it is reproducible too.

    With an ``IterableDataset``, item ``k`` of worker ``w`` is seeded from
    ``(seed, epoch, w, k)``: reproducible for a fixed ``num_workers`` only (invariance to
    ``num_workers`` needs a map-style dataset). The epoch advances when an iteration
    runs to its end; after a break-off, the next ``iter()`` (which re-iterates the
    dataset) continues the item count with ``num_workers=0`` and restarts the workers'
    counts otherwise. ``persistent_workers`` is refused: the epoch cannot reach
    persistent workers.

    Side effects: none on global state. Reads ``TORCHREPRO_SEED`` (when ``seed`` is None)
    and ``TORCHREPRO_NUM_WORKERS`` (which, when set, replaces ``num_workers``; setting 0
    drops ``persistent_workers``, ``prefetch_factor``, ``multiprocessing_context`` and
    ``timeout``, with an INFO log). Warns (:class:`TorchreproWarning`) when the dataset
    holds its own RNG objects, which per-sample seeding cannot reach.

    Args:
        dataset: a map-style or iterable dataset.
        batch_size: as in torch; ``None`` disables batching.
        shuffle: draw a new permutation each epoch (map-style datasets only).
        seed: an int in ``[0, 2**64 - 1]``; ``None`` reads ``TORCHREPRO_SEED``, which
            :func:`torchrepro.seed_everything` sets.
        **kwargs: torch DataLoader keyword arguments (``num_workers``, ``collate_fn``,
            ``pin_memory``, ``drop_last``, ``worker_init_fn`` (runs after
            torchrepro's, which seeds the worker from (seed, worker id)), ...).

    Raises:
        ValueError: no seed; ``sampler``, ``batch_sampler``, ``generator`` or
            ``in_order=False`` given; a bad ``TORCHREPRO_NUM_WORKERS``; shuffle or
            persistent workers with an IterableDataset.
        TypeError: ``seed`` is not an int.

    >>> import torch
    >>> from torchrepro.data import DataLoader
    >>> class Noisy(torch.utils.data.Dataset):
    ...     def __len__(self): return 4
    ...     def __getitem__(self, i): return torch.rand(())
    >>> a = torch.cat(list(DataLoader(Noisy(), batch_size=2, seed=1)))
    >>> b = torch.cat(list(DataLoader(Noisy(), batch_size=2, seed=1)))
    >>> bool(torch.equal(a, b))
    True
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = False,
        *,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_arguments(shuffle, kwargs)
        seed = resolve_seed(seed)
        resolve_workers(kwargs)
        self._repro_seed = seed
        self._repro_building = False
        self._repro_gen = 0  # iterators older than the newest one do not move the position
        self._repro_epoch = 0
        self._repro_batch = 0  # map-style: batches of the epoch the caller received
        self._repro_items = 0  # iterable: items of the epoch the caller received
        self._repro_iterable = isinstance(dataset, IterableDataset)
        sampler: KeySampler | None = None
        self._repro_wrapper: MapWrapper | IterableWrapper
        if self._repro_iterable:
            if shuffle:
                raise ValueError(
                    "shuffle=True needs a map-style dataset; an IterableDataset orders itself"
                )
            if kwargs.get("persistent_workers"):
                raise ValueError(
                    "persistent_workers=True is not supported with an IterableDataset: "
                    "the epoch, which seeds its items, cannot reach persistent workers"
                )
            self._repro_wrapper = IterableWrapper(dataset, seed)
        else:
            world, rank = _dist.world_size(), _dist.group_rank()
            order = Order(
                length=len(dataset),
                batch_size=1 if batch_size is None else batch_size,
                drop_last=bool(kwargs.get("drop_last", False)),
                shuffle=bool(shuffle),
                seed=seed,
                world_size=world,
                rank=rank,
            )
            sampler = KeySampler(order)
            self._repro_wrapper = MapWrapper(dataset, seed)
        kwargs["worker_init_fn"] = WorkerInit(seed, kwargs.get("worker_init_fn"))
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            sampler=sampler,
            # Private, so that torch's base-seed draw leaves the global generator alone.
            generator=torch.Generator().manual_seed(derive_seed(seed, "loader")),
            **kwargs,
        )
        paths = find_rngs(dataset)
        if paths:
            warnings.warn(
                f"the dataset holds its own RNG object(s): {', '.join(paths[:5])}. "
                "torchrepro seeds the global RNGs (random, numpy.random, torch) per sample; "
                "its own generators are not reseeded, so their draws depend on num_workers "
                "and loading order. Draw from the global RNGs, or build the generator inside "
                "__getitem__ from torchrepro.sample_seed().",
                TorchreproWarning,
                stacklevel=2,
            )

    # The base __init__'s `self.dataset = ...` goes through this setter. The getter
    # gives torch's iterator classes the seeding wrapper while _get_iterator() builds
    # one (they read loader.dataset only then; a persistent iterator's _reset does not),
    # and everyone else the user's dataset.
    @property  # type: ignore[override]
    def dataset(self) -> Any:
        if self._repro_building:
            return self._repro_wrapper
        return self._repro_user_dataset

    @dataset.setter
    def dataset(self, value: Any) -> None:
        self._repro_user_dataset = value

    def _get_iterator(self) -> Any:
        self._repro_building = True
        try:
            return super()._get_iterator()
        finally:
            self._repro_building = False

    @property
    def seed(self) -> int:
        """The loader's seed."""
        return self._repro_seed

    @property
    def epoch(self) -> int:
        """The epoch the next iteration produces, or continues."""
        return self._repro_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration start epoch ``epoch`` from its first batch.

        Args:
            epoch: an int >= 0.

        Raises:
            TypeError, ValueError: ``epoch`` is not an int >= 0.

        >>> from torchrepro.data import DataLoader
        >>> loader = DataLoader(list(range(4)), batch_size=2, shuffle=True, seed=0)
        >>> loader.set_epoch(3); loader.epoch
        3
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int >= 0, got {type(epoch).__name__} {epoch!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch}")
        self._repro_gen += 1
        self._repro_epoch, self._repro_batch, self._repro_items = epoch, 0, 0

    def __iter__(self) -> LoaderIter:  # type: ignore[override]
        self._repro_gen += 1
        if self._repro_iterable:
            wrapper = cast(IterableWrapper, self._repro_wrapper)
            # Items in flight in workers cannot be accounted for: their counts restart.
            start = self._repro_items if self.num_workers == 0 else 0
            wrapper.epoch, wrapper.start_item = self._repro_epoch, start
            remaining = -1
        else:
            sampler = cast(KeySampler, self.sampler)
            sampler.epoch, sampler.start_batch = self._repro_epoch, self._repro_batch
            remaining = sampler.order.batches_per_epoch() - self._repro_batch
        inner = super().__iter__()
        _runinfo.note_loader(self, num_workers=self.num_workers)  # for the trace header
        return LoaderIter(self, inner, self._repro_gen, remaining)

    def _received(self, gen: int) -> None:
        """The caller received a batch from the iterator of generation ``gen``."""
        if gen != self._repro_gen:
            return
        if self._repro_iterable:
            self._repro_items = cast(IterableWrapper, self._repro_wrapper).items
            return
        self._repro_batch += 1
        if self._repro_batch >= cast(KeySampler, self.sampler).order.batches_per_epoch():
            self._repro_epoch, self._repro_batch = self._repro_epoch + 1, 0

    def _exhausted(self, gen: int, empty: bool) -> None:
        """The iterator of generation ``gen`` ran out; ``empty``: it yielded nothing."""
        if gen != self._repro_gen:
            return
        if self._repro_iterable:
            self._repro_epoch, self._repro_items = self._repro_epoch + 1, 0
        elif empty and self._repro_batch == 0:  # an empty epoch still counts as one
            self._repro_epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch: a plain versioned dict (JSON- and
        ``torch.load(weights_only=True)``-safe) of the seed, the epoch, the batches of it
        received, and the loader's configuration.

        Batches prefetched by workers but not yet received by the caller do not count.
        With an IterableDataset, the dataset's own ``state_dict()`` is included.

        Returns:
            See ``torchrepro/data/_state.py`` for the keys.

        Raises:
            TorchreproError: the dataset is an IterableDataset and ``num_workers > 0`` (the
                items in flight in workers cannot be accounted for), or it has no
                ``state_dict``/``load_state_dict`` of its own.

        >>> from torchrepro.data import DataLoader
        >>> loader = DataLoader(list(range(10)), batch_size=4, seed=0)
        >>> it = iter(loader); _ = next(it)
        >>> state = loader.state_dict(); state["epoch"], state["batches_received"]
        (0, 1)
        """
        if not self._repro_iterable:
            order = cast(KeySampler, self.sampler).order
            return _state.map_state(
                seed=self._repro_seed,
                epoch=self._repro_epoch,
                batches=self._repro_batch,
                order=order,
                batch_size=self.batch_size,
            )
        self._check_iterable_resumable()
        return _state.iterable_state(
            seed=self._repro_seed,
            epoch=self._repro_epoch,
            items=self._repro_items,
            dataset=self._repro_user_dataset,
        )

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Make the next iteration continue where the loader that saved ``state`` stopped.

        Works in a new process and with another ``num_workers`` or persistent setting.
        Skipped samples are not loaded: the cost is one permutation, O(dataset length).

        Args:
            state: a dict from :meth:`state_dict`.
            strict: with ``False``, a state saved under another world size is accepted,
                and the position is rounded down to a whole global batch of this world
                size (samples may repeat, none are skipped). ``load_checkpoint(strict=False)``
                implies it (through ``_dist.world_size_change_allowed``).

        Raises:
            TypeError: ``state`` or one of its values has the wrong type.
            ValueError: unknown version or keys, a position out of range, or a state made
                for another seed, dataset length, batch_size, drop_last, shuffle or
                (``strict``) world size.
            TorchreproError: see :meth:`state_dict` for IterableDatasets.

        >>> from torchrepro.data import DataLoader
        >>> loader = DataLoader(list(range(10)), batch_size=4, seed=0)
        >>> it = iter(loader); _ = next(it); _ = next(it)
        >>> resumed = DataLoader(list(range(10)), batch_size=4, seed=0)
        >>> resumed.load_state_dict(loader.state_dict()); [b.tolist() for b in resumed]
        [[8, 9]]
        """
        if self._repro_iterable:
            self._check_iterable_resumable()
            epoch, items = _state.load_iterable(
                state, seed=self._repro_seed, dataset=self._repro_user_dataset
            )
            self.set_epoch(epoch)
            self._repro_items = items
            return
        epoch, batches = _state.load_map(
            state,
            seed=self._repro_seed,
            order=cast(KeySampler, self.sampler).order,
            batch_size=self.batch_size,
            strict=strict and not _dist.world_size_change_is_allowed(),
        )
        self.set_epoch(epoch)
        self._repro_batch = batches

    def _check_iterable_resumable(self) -> None:
        dataset = self._repro_user_dataset
        if self.num_workers != 0:
            raise TorchreproError(
                "state_dict/load_state_dict need num_workers=0 with an IterableDataset: "
                f"items in flight in {self.num_workers} workers cannot be accounted for. "
                "Use a map-style dataset to resume with workers."
            )
        if not (hasattr(dataset, "state_dict") and hasattr(dataset, "load_state_dict")):
            raise TorchreproError(
                f"cannot checkpoint the position in {type(dataset).__name__}: an "
                "IterableDataset can only be resumed when it has state_dict() and "
                "load_state_dict() of its own"
            )
