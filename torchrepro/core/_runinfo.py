"""What this process observed about its own run: the facts a trace header records.

Core layer, no I/O. Lower layers *note* what they actually did (a loader: the
``num_workers`` it really used; checkpointing: the step it resumed from); the trace
reads the notes when it writes. This keeps the layering: the loader knows no trace, the
trace knows no loader, and ``torchrepro check`` verifies what runs did rather than what
it asked them to do.

The last batch a torchrepro loader handed out is kept by reference (no copy, no
checksum), so the trace can checksum the batch a step consumed at no cost to untraced
runs.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["clear", "facts", "last_batch", "note", "note_batch", "note_loader", "take_batch"]

_lock = threading.Lock()
_facts: dict[str, Any] = {}
_loaders: dict[int, dict[str, Any]] = {}
_batch: object | None = None


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
    """Keep a reference to the batch a torchrepro loader just handed to the caller."""
    global _batch
    _batch = batch


def last_batch() -> object | None:
    """The batch most recently handed out by a torchrepro loader, or None."""
    return _batch


def take_batch() -> object | None:
    """The batch noted since the last call (then forgotten), or None.

    The trace takes it at each step, so a step that consumed no new batch records none
    rather than an earlier step's.
    """
    global _batch
    batch, _batch = _batch, None
    return batch


def clear() -> None:
    """Forget every note (tests; a fresh run in the same process)."""
    global _batch
    with _lock:
        _facts.clear()
        _loaders.clear()
        _batch = None
