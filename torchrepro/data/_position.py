"""Where the loader is: the epoch, and the batches (or items) of it the caller received.

The rule for passes (one ``iter(loader)`` each, bound to the position at its first
``next()``, so that ``set_epoch`` called between ``iter()`` and the first batch counts):

- a new pass covers the current epoch from its first batch, unless
  :meth:`Position.resume_at` (``load_state_dict``) set a position, which that one pass
  continues from;
- the epoch advances when the caller receives the epoch's last batch (or the pass runs
  out); a pass broken off earlier leaves the epoch as it is, so the next pass is whole;
- ``set_epoch(e)`` with ``e`` the current epoch changes nothing; another ``e`` starts
  that epoch from its first batch;
- only the newest pass counts: an older iterator still yields, but moves nothing.

Batches prefetched by workers but not yet handed to the caller never count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ..core import _runinfo
from ._isolate import check_thread, restore_globals, save_globals, warn_if_cuda_started


class Position:
    """The loader's position; batches for map-style datasets, items for iterable ones."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0
        self.items = 0
        self.pending = False  # a loaded position waits for the next pass
        self.gen = 0  # the newest pass
        self._advanced = False  # the newest pass already moved to the next epoch

    def start_pass(self) -> tuple[int, int, int, int]:
        """Begin a pass: ``(generation, epoch, first batch, first item)``."""
        self.gen += 1
        if not self.pending:
            self.batch = self.items = 0
        self.pending = False
        self._advanced = False
        return self.gen, self.epoch, self.batch, self.items

    def resume_at(self, epoch: int, batch: int = 0, items: int = 0) -> None:
        self.gen += 1
        self.epoch, self.batch, self.items, self.pending = epoch, batch, items, True

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.gen += 1
        self.epoch, self.batch, self.items, self.pending = epoch, 0, 0, False

    def received(self, gen: int, per_epoch: int | None, items: int | None) -> None:
        """The caller received a batch of pass ``gen``; ``per_epoch``: batches, if known."""
        if gen != self.gen or self._advanced:
            return
        self.batch += 1
        if items is not None:
            self.items = items
        if per_epoch is not None and self.batch >= per_epoch:
            self._next_epoch()

    def exhausted(self, gen: int) -> None:
        """Pass ``gen`` ran out."""
        if gen == self.gen and not self._advanced:
            self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch, self.batch, self.items = self.epoch + 1, 0, 0
        self._advanced = True


class Pass(NamedTuple):
    """A pass bound to the position: torch's iterator over its batches, and how to count them."""

    inner: Iterator[Any]
    gen: int
    per_epoch: int | None  # batches per epoch, if known
    count_items: Any  # the iterable wrapper whose item count is read, or None


_OWN = frozenset(("_start", "_position", "_isolate", "_pass", "_done"))


class LoaderIter:
    """What ``iter(loader)`` returns: torch's iterator, counted, and with ``num_workers=0``
    run between a save and a restore of the main process's global RNGs.

    The pass binds (takes its epoch and first batch from the position, and builds torch's
    iterator, which starts workers) at its first ``next()``, or when one of torch's
    iterator attributes (``_workers``, ``_shutdown_workers``, ``len()``, ...) is read first.
    """

    def __init__(self, start: Callable[[], Pass], position: Position, *, isolate: bool) -> None:
        self._start = start
        self._position = position
        self._isolate = isolate
        self._pass: Pass | None = None
        self._done = False

    def _bound(self) -> Pass:
        if self._pass is None:
            self._pass = self._start()
        return self._pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _OWN:
            raise AttributeError(name)
        return getattr(self._bound().inner, name)

    def __iter__(self) -> LoaderIter:
        return self

    def __len__(self) -> int:
        return len(self._bound().inner)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        bound = self._bound()
        try:
            if self._isolate:
                check_thread("loading with num_workers=0")
                saved = save_globals()
                try:
                    batch = next(bound.inner)
                finally:
                    restore_globals(saved)
                if not saved[3]:
                    warn_if_cuda_started()
            else:
                batch = next(bound.inner)
        except StopIteration:
            if not self._done:
                self._done = True
                self._position.exhausted(bound.gen)
            raise
        items = None if bound.count_items is None else bound.count_items.items
        self._position.received(bound.gen, bound.per_epoch, items)
        _runinfo.note_batch(batch)
        return batch
