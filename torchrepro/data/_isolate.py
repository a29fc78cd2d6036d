"""Save and restore the main process's global RNGs around each batch (num_workers=0).

Python ``random`` and torch's CPU generator are saved with their own calls (~10 us
together). NumPy's ``get_state``/``set_state`` cost ~40 us each, so NumPy's global
MT19937 takes a fast path: its 2,500-byte state (key and position) is copied through
the bit generator's documented ctypes ``state_address``. The legacy Gaussian cache of
``RandomState`` is not reachable that way, so the fast path is taken only while that
cache is empty (the common case), and the layout is checked once against
``get_state()``; otherwise the public calls are used. (One contrived sequence defeats
it: between two batches, ``np.random.set_state`` to a state with the key just restored
and a full cache.)
"""

from __future__ import annotations

import ctypes
import random
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from .. import _runinfo

_MT_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos
_torch_gen = torch.default_generator


class _NumpyState:
    """Fast save/restore of NumPy's global RandomState."""

    def __init__(self, np: Any) -> None:
        self.np = np
        self.rand = np.random.mtrand._rand
        self.address: int | None = None
        self.restored: bytes | None = None  # bytes last restored with an empty Gaussian cache
        try:
            bit_generator = self.rand._bit_generator
            if type(bit_generator).__name__ == "MT19937":
                address = int(bit_generator.ctypes.state_address)
                _, key, pos, _, _ = self.rand.get_state()
                expected = key.astype("<u4").tobytes() + int(pos).to_bytes(4, sys.byteorder)
                if ctypes.string_at(address, _MT_BYTES) == expected:
                    self.address = address
        except Exception:  # another NumPy layout: keep the public path
            self.address = None

    def save(self) -> tuple[str, Any]:
        if self.address is None:
            return ("full", self.rand.get_state())
        raw = ctypes.string_at(self.address, _MT_BYTES)
        if raw == self.restored:
            # Unchanged key and position since our restore with an empty cache: a Gaussian
            # draw would have advanced the key, so the cache is still empty.
            return ("fast", raw)
        state = self.rand.get_state()
        return ("fast", raw) if state[3] == 0 else ("full", state)

    def restore(self, saved: tuple[str, Any]) -> None:
        kind, value = saved
        if kind == "fast" and self.address is not None:
            self.rand.seed(0)  # empties the Gaussian cache; the key is overwritten next
            ctypes.memmove(self.address, value, _MT_BYTES)
            self.restored = value
        else:
            self.rand.set_state(value)
            self.restored = None


_numpy_state: _NumpyState | None = None


def _numpy() -> _NumpyState | None:
    global _numpy_state
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if _numpy_state is None or _numpy_state.np is not np:
        _numpy_state = _NumpyState(np)
    return _numpy_state


def save_globals() -> tuple[Any, Any, torch.Tensor]:
    """The state of ``random``, NumPy's global RNG (if imported) and torch CPU."""
    np = _numpy()
    return (random.getstate(), np.save() if np is not None else None, _torch_gen.get_state())


def restore_globals(state: tuple[Any, Any, torch.Tensor]) -> None:
    """Restore what :func:`save_globals` captured."""
    py, np_saved, torch_state = state
    random.setstate(py)
    if np_saved is not None:
        np = _numpy()
        if np is not None:
            np.restore(np_saved)
    _torch_gen.set_state(torch_state)


class _Loader(Protocol):
    num_workers: int

    def __len__(self) -> int: ...
    def _received(self, gen: int) -> None: ...
    def _exhausted(self, gen: int, empty: bool) -> None: ...


class LoaderIter:
    """Counts the batches the caller receives; isolates the global RNGs with num_workers=0."""

    def __init__(self, loader: _Loader, inner: Iterator[Any], gen: int, remaining: int) -> None:
        self._loader = loader
        self._inner = inner
        self._gen = gen
        self._remaining = remaining
        self._empty = remaining == 0
        self._done = False
        self._isolate = loader.num_workers == 0

    def __iter__(self) -> LoaderIter:
        return self

    def __len__(self) -> int:
        if self._remaining >= 0:
            return self._remaining
        return len(self._loader)

    def __next__(self) -> Any:
        try:
            if self._isolate:
                saved = save_globals()
                try:
                    batch = next(self._inner)
                finally:
                    restore_globals(saved)
            else:
                batch = next(self._inner)
        except StopIteration:
            if not self._done:
                self._done = True
                self._loader._exhausted(self._gen, self._empty)
            raise
        if self._remaining > 0:
            self._remaining -= 1
        self._loader._received(self._gen)
        _runinfo.note_batch(batch)  # the trace checksums the batch each step consumed
        return batch
