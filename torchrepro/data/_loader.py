"""``torchrepro.DataLoader``: torch's DataLoader with per-sample seeding and a resumable order.

Built by composition: the public object carries torch's attributes exactly as torch
would (``dataset`` is the user's dataset), and each pass is run by a private plain
torch DataLoader over a seeding wrapper of the dataset and a batch sampler that yields
:class:`~torchrepro.data._keys.KeyBatch` es.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    IterableDataset,
    IterDataPipe,
    SequentialSampler,
)
from torch.utils.data import dataloader as _torch_dataloader

from .._errors import TorchreproError, TorchreproWarning
from ..core import _dist, _runinfo
from ..core._seed import derive_seed
from . import _state, _streams
from ._inspect import find_rngs
from ._isolate import check_thread, restore_globals, save_globals
from ._options import (
    check_arguments,
    check_epoch,
    drop_worker_only,
    forced_workers,
    resolve_seed,
)
from ._position import LoaderIter, Pass, Position
from ._sampler import Guarded, KeySampler, Order, UserOrder
from ._seeding import Collate, IterableWrapper, MapWrapper, WorkerInit

__all__ = ["DataLoader"]

log = logging.getLogger("torchrepro")
T_co = TypeVar("T_co", covariant=True)

# torch's class as imported, even if something later replaces torch.utils.data.DataLoader
# with this one (a test harness): the passes run on it.
_TorchLoader = _torch_dataloader.DataLoader


class _Batches:
    """The private loader's batch sampler: the current pass's batches."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterator[Any]] = lambda: iter(())
        self.length = 0  # a number, not the loader's __len__: no cycle keeps workers alive

    def __iter__(self) -> Iterator[Any]:
        return self.source()

    def __len__(self) -> int:
        return self.length

    def __reduce__(self) -> tuple[type[_Batches], tuple[()]]:
        return (_Batches, ())  # set again before each pass


class DataLoader(torch.utils.data.DataLoader[T_co]):
    """torch's DataLoader whose output is a pure function of (seed, epoch, sample position).

    Before ``dataset[i]`` runs, in whatever process runs it, Python ``random``, NumPy's
    global RNG and torch's CPU generator (and CUDA's, when CUDA is initialised there)
    are seeded for that sample (see :func:`torchrepro.sample_seed`), so random
    augmentations do not depend on ``num_workers``, ``persistent_workers``, the start
    method, ``prefetch_factor`` or ``pin_memory``. The main process's global RNGs are
    never drawn from or left changed (with ``num_workers=0`` they are saved before and
    restored after each batch; this needs the main thread), so the training loop's
    randomness does not depend on data loading.

    **Order.** Without ``sampler``/``batch_sampler``, epoch ``e`` is a permutation keyed by
    ``(seed, e)`` (or the identity), computed at the positions read (O(1) per sample at any
    dataset size; a state saved before this order existed resumes with the ``randperm`` of
    then), split into global batches across ranks (rank and world size are read when each
    iteration starts); each sample is seeded from ``(seed, epoch, index)``; resuming skips
    to the position at no cost. A user's
    ``sampler`` (WeightedRandomSampler, SubsetRandomSampler, your own) or ``batch_sampler``
    (length buckets) runs in its own RNG context seeded from ``(seed, epoch)``: its
    ``generator`` is reseeded and ``set_epoch(e)`` called at each epoch; each sample is
    seeded from ``(seed, epoch, rank, position in the stream)``; resuming replays the
    sampler's indices without loading a sample. A ``DistributedSampler`` over the same
    dataset (injected by a framework) is replaced by torchrepro's global-batch split,
    with a log line.

    **Streams.** Every loader of a process is its own stream (order and per-sample
    randomness), named by :attr:`stream`: ``"generator:<s>"`` when ``generator=`` is given
    (``s`` is its ``initial_seed()``; the generator is not drawn from), else
    ``"created:<k>"``, the loader's place in the process's creation order among loaders
    keyed that way (0 for the first). A loader built from another's ``sampler`` or
    ``batch_sampler`` (Lightning's re-creation) inherits its stream. Two loaders share a
    stream when given generators of the same seed. ``"created:0"`` is the stream of
    torchrepro before keys existed; every other key derives its streams from
    ``derive_seed(seed, "loader-stream", key)`` in place of ``seed``. The key travels in
    :meth:`state_dict` and :meth:`load_state_dict` restores it, so a resumed loader
    continues its own stream whatever order the script builds its loaders in.

    **Passes.** Each ``iter()`` is a pass over the current epoch from its first batch,
    except the first after :meth:`load_state_dict`, which continues from the loaded
    position; a pass takes its epoch at its first ``next()``, so ``set_epoch`` between
    ``iter()`` and the first batch counts. The epoch advances when the caller receives its
    last batch, and when a pass that yielded batches is broken off (its iterator dropped
    after ``break``, or a newer pass started): the next pass starts the next epoch's order.
    A pass that yielded nothing moves nothing. ``set_epoch(e)`` always wins: with the
    current epoch it keeps a loaded position and makes the next pass cover that epoch.
    A loader built over a dataset that an earlier loader read warns once, naming
    ``set_epoch`` (it is a new stream, not the next epoch).

    **Rebuilds.** ``loader.sampler`` and ``loader.batch_sampler`` may be iterated only by a
    torchrepro loader: a plain DataLoader rebuilt from them raises :class:`TorchreproError`
    naming the code that rebuilt it. ``torchrepro.DataLoader(**the same attributes)``
    (Lightning's re-creation) keeps every guarantee. The dataset only ever receives the
    indices it expects; ``get_worker_info().dataset`` is the user's dataset.

    With an ``IterableDataset``, item ``k`` of worker ``w`` is seeded from
    ``(seed, epoch, w, k)``: reproducible for a fixed ``num_workers`` only. Persistent
    workers and ``in_order=False`` work (with ``in_order=False`` the batches' contents are
    reproducible, their order is not, and a mid-epoch position cannot be saved).

    Side effects: none on global state. Reads ``TORCHREPRO_SEED`` (when ``seed`` is None)
    and ``TORCHREPRO_NUM_WORKERS`` (which, when set, replaces ``num_workers``; setting 0
    drops ``persistent_workers``, ``prefetch_factor``, ``multiprocessing_context`` and
    ``timeout``, with an INFO log). Warns (:class:`TorchreproWarning`) when the dataset or
    a user's sampler holds its own RNG objects, which per-sample seeding cannot reach.

    Args:
        dataset, batch_size, shuffle, sampler, batch_sampler, num_workers, collate_fn,
            pin_memory, drop_last, timeout, worker_init_fn (runs after torchrepro's, which
            seeds the worker from (seed, worker id)), multiprocessing_context,
            prefetch_factor, persistent_workers, pin_memory_device, in_order: as in torch.
        generator: a ``torch.Generator`` whose ``initial_seed()`` keys the loader's stream
            (see **Streams**), or None; it is kept as an attribute and never drawn from.
        seed: an int in ``[0, 2**64 - 1]``; ``None`` reads ``TORCHREPRO_SEED``, which
            :func:`torchrepro.seed_everything` sets.

    Raises:
        ValueError: no seed; a bad ``TORCHREPRO_NUM_WORKERS``; torch's own refusals
            (e.g. ``shuffle`` with ``sampler``, a sampler with an IterableDataset).
        TypeError: an argument of the wrong type (``num_workers="2"``, ``dataset=None``,
            a ``generator`` that is not a ``torch.Generator``).

    >>> import torch
    >>> from torchrepro.data import DataLoader
    >>> class Noisy(torch.utils.data.Dataset):
    ...     def __len__(self): return 4
    ...     def __getitem__(self, i): return torch.rand(())
    >>> same = lambda: torch.Generator().manual_seed(7)  # one key: one stream for both
    >>> a = torch.cat(list(DataLoader(Noisy(), batch_size=2, seed=1, generator=same())))
    >>> b = torch.cat(list(DataLoader(Noisy(), batch_size=2, seed=1, generator=same())))
    >>> bool(torch.equal(a, b))
    True
    """

    def __init__(  # noqa: PLR0917 (torch's signature)
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        seed: int | None = None,
    ) -> None:
        check_arguments(
            dataset=dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            drop_last=drop_last,
            timeout=timeout,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            in_order=in_order,
            with_sampler=sampler is not None
            or batch_sampler is not None
            or isinstance(dataset, IterableDataset),
        )
        self.seed = resolve_seed(seed)
        forced = forced_workers()
        if forced is not None:
            num_workers = forced
            if forced == 0:
                persistent_workers = drop_worker_only(
                    "persistent_workers", persistent_workers, False
                )
                prefetch_factor = drop_worker_only("prefetch_factor", prefetch_factor, None)
                multiprocessing_context = drop_worker_only(
                    "multiprocessing_context", multiprocessing_context, None
                )
                timeout = drop_worker_only("timeout", timeout, 0)
        self._repro_position = Position()
        self._repro_inner: Any = None  # the private loader kept for persistent workers
        self._repro_batches = _Batches()
        self._repro_user: UserOrder | None = None
        self._repro_own: Order | None = None
        self._repro_iterable = isinstance(dataset, IterableDataset)
        self._repro_shuffle = shuffle

        inherited = _inherited_stream(sampler, batch_sampler)
        sampler, batch_sampler, batch_size, shuffle, drop_last = _adopt(
            dataset=dataset,
            sampler=sampler,
            batch_sampler=batch_sampler,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        own = not self._repro_iterable and sampler is None and batch_sampler is None
        public_sampler = (
            KeySampler(self, bool(shuffle)) if own else _guard(sampler, self, "loader.sampler")
        )
        self._repro_unbatched = batch_size is None and batch_sampler is None
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=None if own else shuffle,
            sampler=public_sampler,
            batch_sampler=_guard(batch_sampler, self, "loader.batch_sampler"),
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            pin_memory_device=pin_memory_device,
            in_order=in_order,
        )
        self._repro_stream = inherited if inherited is not None else _streams.key_for(generator)
        if inherited is None:
            _streams.warn_if_read(dataset, self._repro_stream)
        self._repro_stream_seed = _streams.stream_seed(self.seed, self._repro_stream)
        key_seed = self._repro_stream_seed
        if self._repro_iterable:
            self._repro_wrapper: MapWrapper | IterableWrapper = IterableWrapper(dataset, key_seed)
        else:
            self._repro_wrapper = MapWrapper(dataset, key_seed)
            if own:
                self._repro_own = Order(
                    length=0,
                    batch_size=1 if batch_size is None else batch_size,
                    drop_last=drop_last,
                    shuffle=bool(shuffle),
                    seed=key_seed,
                )
            else:
                source = batch_sampler if batch_sampler is not None else sampler
                self._repro_user = UserOrder(
                    source=source,
                    batched=batch_sampler is not None,
                    batch_size=batch_size,
                    drop_last=drop_last,
                    seed=key_seed,
                )
                if batch_sampler is not None:
                    # torch sets a SequentialSampler, which a rebuild could use unseeded.
                    object.__setattr__(
                        self, "sampler", Guarded(SequentialSampler(dataset), self, "loader.sampler")
                    )
        if not in_order and self.num_workers > 0:
            warnings.warn(
                "in_order=False: each batch's contents are reproducible, but the order in "
                "which batches arrive depends on worker timing, so training runs may differ "
                "and a mid-epoch position cannot be saved; use in_order=True to reproduce runs",
                TorchreproWarning,
                stacklevel=2,
            )
        _warn_rngs(dataset, "dataset", ())
        if self._repro_user is not None:
            _warn_rngs(self._repro_user.source, "sampler", ("generator",))

    # --- torch's surface ------------------------------------------------------------

    def __len__(self) -> int:
        if self._repro_iterable:
            return super().__len__()
        if self._repro_user is not None:
            return self._repro_user.batches_per_epoch()
        return self._repro_order().batches_per_epoch()

    def _repro_order(self) -> Order:
        """The own order with the dataset length, rank and world size of now."""
        order = cast(Order, self._repro_own)
        order.length = len(self.dataset)  # type: ignore[arg-type]
        order.world_size, order.rank = _dist.world_size(), _dist.group_rank()
        return order

    def __iter__(self) -> LoaderIter:  # type: ignore[override]
        isolate = self.num_workers == 0
        if isolate or self._repro_user is not None:
            check_thread("loading with num_workers=0" if isolate else "the sampler")
        _runinfo.note_loader(self, num_workers=self.num_workers, iterable=self._repro_iterable)
        # The pass binds its epoch and position at its first next(), not here: frameworks
        # call iter() and then set_epoch() (Lightning, resuming from an epoch-end checkpoint).
        return LoaderIter(self._repro_start_pass, self._repro_position, isolate=isolate)

    def _repro_start_pass(self) -> Pass:
        """Bind a pass to the position: build torch's iterator over the epoch's batches."""
        isolate = self.num_workers == 0
        if isolate or self._repro_user is not None:
            check_thread("loading with num_workers=0" if isolate else "the sampler")
        position = self._repro_position
        gen, epoch, start, start_item = position.start_pass()
        _streams.note_read(self)
        check_epoch(epoch, "the loader's epoch")  # past 2**64 - 1 after the last one ran
        per_epoch: int | None
        count_items = None
        if self._repro_iterable:
            wrapper = cast(IterableWrapper, self._repro_wrapper)
            if self.num_workers:
                wrapper.share()
                start_item = 0  # items in flight in workers cannot be accounted for
            wrapper.set_position(epoch, start_item)
            per_epoch = None
            count_items = wrapper if isolate else None
        elif self._repro_user is not None:
            user = self._repro_user
            rank = _dist.group_rank()
            self._repro_batches.source = lambda: user.batches(epoch, start, rank)
            per_epoch = _length_or_none(user)
        else:
            order = self._repro_order()
            unbatched = self._repro_unbatched
            self._repro_batches.source = lambda: order.batches(epoch, start, unbatched)
            per_epoch = order.batches_per_epoch()
        self._repro_batches.length = per_epoch or 0  # torch's iterator __len__
        inner = self._inner_loader()
        # torch's per-pass draws (worker base seed, a datapipe's shuffle seed) come from
        # the private generator: a function of (seed, epoch).
        inner.generator.manual_seed(derive_seed(self._repro_stream_seed, "loader", epoch))
        if self._repro_iterable:  # torch warns when more items come than len() said
            inner._IterableDataset_len_called = self._IterableDataset_len_called
        if isolate:  # building the iterator may already load (an iterable's iter(dataset))
            saved = save_globals()
            try:
                inner_iter = iter(inner)
            finally:
                restore_globals(saved)
        else:
            inner_iter = iter(inner)
        return Pass(inner_iter, gen, per_epoch, count_items)

    def _inner_loader(self) -> Any:
        if self._repro_inner is not None:
            return self._repro_inner
        workers = self.num_workers
        kwargs: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": self.pin_memory,
            "timeout": self.timeout,
            "worker_init_fn": WorkerInit(self._repro_stream_seed, self.worker_init_fn),
            # Private, so that torch's base-seed draw leaves the global generator alone.
            "generator": torch.Generator().manual_seed(
                derive_seed(self._repro_stream_seed, "loader")
            ),
            "pin_memory_device": self.pin_memory_device,
            "in_order": self.in_order,
        }
        if workers:
            kwargs.update(
                multiprocessing_context=self.multiprocessing_context,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=self.persistent_workers,
            )
        if self._repro_iterable:
            datapipe = isinstance(self.dataset, IterDataPipe)
            if datapipe:
                kwargs["shuffle"] = self._repro_shuffle
            inner = _TorchLoader(
                # torch shards and seeds a datapipe itself (from the private generator).
                self.dataset if datapipe else self._repro_wrapper,
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                collate_fn=self.collate_fn,
                **kwargs,
            )
        else:
            inner = _TorchLoader(
                self._repro_wrapper,
                batch_sampler=self._repro_batches,
                collate_fn=Collate(self.collate_fn, self._repro_unbatched),
                **kwargs,
            )
        if workers and self.persistent_workers:
            self._repro_inner = inner
        return inner

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_repro_inner"] = None  # worker processes do not travel
        return state

    # --- stream and position ----------------------------------------------------------

    @property
    def stream(self) -> str:
        """The key of this loader's stream (order and per-sample randomness):
        ``"generator:<seed>"`` or ``"created:<k>"``; see the class docstring."""
        return self._repro_stream

    def _repro_use_stream(self, key: str) -> None:
        """Draw from the stream ``key`` (a loaded state's) from the next pass on."""
        if key == self._repro_stream:
            return
        self._repro_stream = key
        seed = self._repro_stream_seed = _streams.stream_seed(self.seed, key)
        if self._repro_iterable:
            self._repro_wrapper = IterableWrapper(self.dataset, seed)
        else:
            self._repro_wrapper = MapWrapper(self.dataset, seed)
        if self._repro_own is not None:
            self._repro_own.reseed(seed)
        if self._repro_user is not None:
            self._repro_user.reseed(seed)
        self._repro_inner = None  # persistent workers hold the old stream's wrapper

    @property
    def epoch(self) -> int:
        """The epoch the next iteration produces (or continues, after ``load_state_dict``)."""
        return self._repro_position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass cover epoch ``epoch`` from its first batch; with the current
        epoch, a position loaded by :meth:`load_state_dict` is kept (frameworks call this
        right after a resume), as is the count of a pass running, and a pass broken off does
        not advance the epoch; with another epoch, a pass already running (past its first
        batch) goes on yielding, but no longer moves the position.

        Args:
            epoch: an int in ``[0, 2**64 - 1]``.

        Raises:
            TypeError, ValueError: ``epoch`` is not an int in that range.

        >>> from torchrepro.data import DataLoader
        >>> loader = DataLoader(list(range(4)), batch_size=2, shuffle=True, seed=0)
        >>> loader.set_epoch(3); loader.epoch
        3
        """
        self._repro_position.set_epoch(check_epoch(epoch))

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
                ``state_dict``/``load_state_dict`` of its own; ``in_order=False`` with
                workers, mid-epoch.

        >>> from torchrepro.data import DataLoader
        >>> loader = DataLoader(list(range(10)), batch_size=4, seed=0)
        >>> it = iter(loader); _ = next(it)
        >>> state = loader.state_dict(); state["epoch"], state["batches_received"]
        (0, 1)
        """
        position = self._repro_position
        if self._repro_iterable:
            self._check_iterable_resumable()
            return _state.iterable_state(
                seed=self.seed,
                stream=self._repro_stream,
                epoch=position.epoch,
                items=position.items,
                dataset=self.dataset,
            )
        if not self.in_order and self.num_workers > 0 and position.batch:
            raise TorchreproError(
                "state_dict() mid-epoch needs in_order=True: with in_order=False the batches "
                "received are not a prefix of the epoch's order, so no position describes them"
            )
        if self._repro_user is not None:
            return _state.sampler_state(
                seed=self.seed,
                stream=self._repro_stream,
                epoch=position.epoch,
                batches=position.batch,
                samples=position.batch,
                length=len(self.dataset),  # type: ignore[arg-type]
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                world_size=_dist.world_size(),
            )
        return _state.map_state(
            seed=self.seed,
            stream=self._repro_stream,
            epoch=position.epoch,
            batches=position.batch,
            order=self._repro_order(),
            batch_size=self.batch_size,
        )

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Make the next iteration continue where the loader that saved ``state`` stopped.

        Works in a new process and with another ``num_workers`` or persistent setting.
        Skipped samples are not loaded: with torchrepro's order the cost is O(1) (one
        permutation, O(dataset length), for a state of the old ``randperm`` order); with a
        user's sampler, replaying its indices.

        Args:
            state: a dict from :meth:`state_dict`.
            strict: with ``False``, a state saved under another world size is accepted
                (also with another per-rank ``batch_size``, as when the global batch is
                kept constant), and the position is rounded down to a whole global batch
                of this world size (samples may repeat, none are skipped).
                ``load_checkpoint(strict=False)`` implies it.

        Raises:
            TypeError: ``state`` or one of its values has the wrong type.
            ValueError: unknown version or keys, a position out of range, or a state made
                for another seed, dataset length, batch_size, drop_last, shuffle, order or
                (``strict``) world size.
            TorchreproError: see :meth:`state_dict` for IterableDatasets.

        >>> from torchrepro.data import DataLoader
        >>> loader = DataLoader(list(range(10)), batch_size=4, seed=0)
        >>> it = iter(loader); _ = next(it); _ = next(it)
        >>> resumed = DataLoader(list(range(10)), batch_size=4, seed=0)
        >>> resumed.load_state_dict(loader.state_dict()); [b.tolist() for b in resumed]
        [[8, 9]]
        """
        position = self._repro_position
        if self._repro_iterable:
            self._check_iterable_resumable()
            stream, epoch, items, dataset_state = _state.load_iterable(state, seed=self.seed)
            self._repro_use_stream(stream)
            cast(IterableWrapper, self._repro_wrapper).pending_state = dataset_state
            position.resume_at(epoch, items=items)
            return
        if self._repro_user is not None:
            stream, epoch, batches = _state.load_sampler(
                state,
                seed=self.seed,
                length=len(self.dataset),  # type: ignore[arg-type]
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                world_size=_dist.world_size(),
            )
            self._repro_use_stream(stream)
            position.resume_at(epoch, batches)
            return
        stream, permutation, epoch, batches = _state.load_map(
            state,
            seed=self.seed,
            order=self._repro_order(),
            batch_size=self.batch_size,
            strict=strict and not _dist.world_size_change_is_allowed(),
        )
        self._repro_use_stream(stream)
        cast(Order, self._repro_own).algorithm = permutation  # sticks: later epochs too
        position.resume_at(epoch, batches)

    def _check_iterable_resumable(self) -> None:
        dataset = self.dataset
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


def _length_or_none(user: UserOrder) -> int | None:
    try:
        return user.batches_per_epoch()
    except TypeError:  # a sampler without __len__: the epoch ends when it runs out
        return None


def _adopt(
    *,
    dataset: Any,
    sampler: Any,
    batch_sampler: Any,
    batch_size: int | None,
    shuffle: bool | None,
    drop_last: bool,
) -> tuple[Any, Any, int | None, bool | None, bool]:
    """Take over samplers that stand for torchrepro's own order: another torchrepro
    loader's (a rebuild from its attributes) and a DistributedSampler over the dataset."""
    # Another torchrepro loader's guarded samplers: the user's objects they guard.
    if type(batch_sampler) is BatchSampler and isinstance(batch_sampler.sampler, Guarded):
        sampler = batch_sampler.sampler.source
        batch_size, drop_last = batch_sampler.batch_size, batch_sampler.drop_last
        batch_sampler = None
    if isinstance(sampler, Guarded):
        sampler = sampler.source
    if isinstance(batch_sampler, Guarded):
        batch_sampler = batch_sampler.source
    if type(batch_sampler) is BatchSampler and isinstance(batch_sampler.sampler, KeySampler):
        shuffle = batch_sampler.sampler.shuffle
        batch_size, drop_last = batch_sampler.batch_size, batch_sampler.drop_last
        return None, None, batch_size, shuffle, drop_last
    if isinstance(sampler, KeySampler):
        return None, batch_sampler, batch_size, sampler.shuffle, drop_last
    wrapped = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    if (
        isinstance(sampler, DistributedSampler)
        and isinstance(wrapped, KeySampler)
        and "Unrepeated" not in type(sampler).__name__
    ):
        # Lightning's DistributedSamplerWrapper around a torchrepro loader's sampler.
        log.info(
            "torchrepro: %s around a torchrepro loader's sampler replaced by torchrepro's "
            "global-batch split (shuffle=%s, as the original loader)",
            type(sampler).__name__,
            wrapped.shuffle,
        )
        return None, batch_sampler, batch_size, wrapped.shuffle, drop_last or sampler.drop_last
    if (
        type(sampler) is DistributedSampler
        and sampler.dataset is dataset
        and (sampler.num_replicas, sampler.rank) == (_dist.world_size(), _dist.group_rank())
    ):
        log.info(
            "torchrepro: DistributedSampler(num_replicas=%d, rank=%d, shuffle=%s) replaced by "
            "torchrepro's global-batch split (same samples per global batch at any world "
            "size; rank and world size read at each iteration)",
            sampler.num_replicas,
            sampler.rank,
            sampler.shuffle,
        )
        return None, batch_sampler, batch_size, sampler.shuffle, drop_last or sampler.drop_last
    return sampler, batch_sampler, batch_size, shuffle, drop_last


def _inherited_stream(sampler: Any, batch_sampler: Any) -> str | None:
    """The stream key of the torchrepro loader whose samplers these are (a rebuild), if any."""
    candidates = (
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        sampler,
        getattr(getattr(sampler, "dataset", None), "_sampler", None),  # Lightning's wrapper
    )
    for obj in candidates:
        if isinstance(obj, (Guarded, KeySampler)):
            loader = obj._loader()
            if loader is not None:
                return cast(str, loader._repro_stream)
    return None


def _guard(source: Any, loader: DataLoader[Any], what: str) -> Any:
    return None if source is None else Guarded(source, loader, what)


def _warn_rngs(obj: Any, root: str, handled: tuple[str, ...]) -> None:
    skip = tuple(f"{root}{p}.{name} " for name in handled for p in ("", ".sampler"))
    paths = [p for p in find_rngs(obj, root=root) if not p.startswith(skip)]
    if paths:
        warnings.warn(
            f"the {root} holds its own RNG object(s): {', '.join(paths[:5])}. "
            "torchrepro seeds the global RNGs (random, numpy.random, torch) per sample"
            + (" and reseeds a sampler's torch generator per epoch" if root == "sampler" else "")
            + "; its own generators are not reseeded, so their draws depend on num_workers "
            "and loading order. Draw from the global RNGs, or build the generator inside "
            "__getitem__ from torchrepro.sample_seed().",
            TorchreproWarning,
            stacklevel=3,
        )
