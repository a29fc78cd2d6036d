"""What this process observed about its own run: the facts a trace header records.

Core layer, no I/O. Lower layers *note* what they actually did (a loader: the
``num_workers`` it really used; checkpointing: the step it resumed from); the trace
reads the notes when it writes. This keeps the layering: the loader knows no trace, the
trace knows no loader, and ``torchrepro check`` verifies what runs did rather than what
it asked them to do.

The last batch a torchrepro loader handed out is kept by reference (no copy, no
checksum), so the trace can checksum the batch a step consumed at no cost to untraced
runs; batches fetched by other threads are kept in order until a step takes them.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

__all__ = [
    "clear",
    "facts",
    "last_batch",
    "note",
    "note_batch",
    "note_loader",
    "note_tracing",
    "take_batch",
]

_lock = threading.Lock()
_facts: dict[str, Any] = {}
_loaders: dict[int, dict[str, Any]] = {}
_batch: object | None = None
# Batches other threads fetched, oldest first, until a step takes them (see note_batch).
# Kept only while a Trace exists; MAX_AHEAD bounds the batches held (a prefetch queue is
# a few batches deep).
MAX_AHEAD = 32
_fetched: collections.deque[object] = collections.deque()
_overflowed = [False]
_tracing = [False]


def note(key: str, value: Any) -> None:
    """Record one observed fact (a JSON-serialisable value), replacing an earlier one."""
    with _lock:
        _facts[key] = value


def note_loader(loader: object, **fields: Any) -> None:
    """Record what a loader really used (e.g. ``num_workers``), once per loader object."""
    with _lock:
        _loaders[id(loader)] = dict(fields)


def facts() -> dict[str, Any]:
    """A copy of every fact noted so far; loaders under ``"loaders"`` in creation order."""
    with _lock:
        out = dict(_facts)
        out["loaders"] = [dict(v) for v in _loaders.values()]
        return out


def note_batch(batch: object) -> None:
    """Keep a reference to the batch a torchrepro loader just handed to the caller.

    A batch fetched in the main thread (where training steps the trace) replaces the one
    noted before it (the step consumed the last). Batches fetched in other threads (a prefetch thread that
    fills a queue) wait in the order they were fetched, so each step takes the next one
    whatever the thread's timing: a loader yields its batches in a fixed order, and the
    queue between the threads keeps it.
    """
    global _batch
    if threading.current_thread() is threading.main_thread():
        _batch = batch
        return
    with _lock:
        if not _tracing[0] or _overflowed[0]:
            return
        if len(_fetched) < MAX_AHEAD:
            _fetched.append(batch)
        else:  # steps take fewer batches than the thread fetches: the pairing is lost
            _overflowed[0] = True
            _fetched.clear()  # and the batches are not held any longer


def note_tracing() -> None:
    """A trace will take batches: keep those other threads fetch (else none is kept)."""
    _tracing[0] = True


def last_batch() -> object | None:
    """The batch most recently handed out by a torchrepro loader, or None."""
    with _lock:
        return _fetched[-1] if _fetched else _batch


def take_batch() -> object | None:
    """The batch the current step consumed, or None (then forgotten).

    The last batch noted in this thread since the previous step; else the oldest batch
    another thread fetched and no step has taken yet. The trace takes it at each step, so
    a step that consumed no new batch records none rather than an earlier step's; after
    more than ``MAX_AHEAD`` batches from other threads went untaken, none is recorded
    (which batch a step consumed is then unknown).
    """
    global _batch
    batch, _batch = _batch, None
    if batch is not None:
        return batch
    with _lock:
        if _overflowed[0] or not _fetched:
            return None
        return _fetched.popleft()


def clear() -> None:
    """Forget every note (tests; a fresh run in the same process)."""
    global _batch
    with _lock:
        _facts.clear()
        _loaders.clear()
        _batch = None
        _fetched.clear()
        _overflowed[0] = False
        _tracing[0] = False
