"""Where the loader is: the epoch, and the batches (or items) of it the caller received.

The rule for passes (one ``iter(loader)`` each):

- a new ``iter()`` starts a fresh pass over the current epoch from its first batch,
  unless :meth:`Position.resume_at` (``load_state_dict``) set a position, which that
  one ``iter()`` continues from;
- the epoch advances when the caller receives the epoch's last batch (or the pass runs
  out); a pass broken off earlier leaves the epoch as it is, so the next pass is whole;
- ``set_epoch(e)`` with ``e`` the current epoch changes nothing; another ``e`` starts
  that epoch from its first batch;
- only the newest pass counts: an older iterator still yields, but moves nothing.

Batches prefetched by workers but not yet handed to the caller never count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


class LoaderIter:
    """What ``iter(loader)`` returns: torch's iterator, counted, and with ``num_workers=0``
    run between a save and a restore of the main process's global RNGs. Other attributes
    (torch's ``_workers``, ``_shutdown_workers``, ...) are torch's iterator's."""

    def __init__(
        self,
        inner: Iterator[Any],
        position: Position,
        gen: int,
        *,
        per_epoch: int | None,
        isolate: bool,
        count_items: Any = None,
    ) -> None:
        self._inner = inner
        self._position = position
        self._gen = gen
        self._per_epoch = per_epoch
        self._isolate = isolate
        self._count_items = count_items  # the iterable wrapper, whose item count we read
        self._done = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __iter__(self) -> LoaderIter:
        return self

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        try:
            if self._isolate:
                check_thread("loading with num_workers=0")
                saved = save_globals()
                try:
                    batch = next(self._inner)
                finally:
                    restore_globals(saved)
                if not saved[3]:
                    warn_if_cuda_started()
            else:
                batch = next(self._inner)
        except StopIteration:
            if not self._done:
                self._done = True
                self._position.exhausted(self._gen)
            raise
        items = None if self._count_items is None else self._count_items.items
        self._position.received(self._gen, self._per_epoch, items)
        _runinfo.note_batch(batch)
        return batch
