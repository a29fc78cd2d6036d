"""Save and restore the main process's global RNGs around code that draws from them.

Used around each batch loaded with ``num_workers=0`` and around each pull from a user's
sampler, so the training loop's draws never depend on data loading.

Python ``random`` and torch's CPU generator are saved with their own calls (~10 us
together). NumPy's ``get_state``/``set_state`` cost ~40 us each, so NumPy's global
MT19937 takes a fast path: its 2,500-byte state (key and position) is copied through
the bit generator's documented ctypes ``state_address``. The legacy Gaussian cache of
``RandomState`` is not reachable that way, so the fast path is taken only while that
cache is empty (the common case), and the layout is checked once against
``get_state()``; otherwise the public calls are used. (One contrived sequence defeats
it: between two batches, ``np.random.set_state`` to a state with the key just restored
and a full cache.) After ``np.random.set_bit_generator(...)`` the bit generator's own
``state`` property is used.

CUDA generators are saved only when CUDA is already initialised (a query never
initialises it).

The global RNGs are shared by every thread of the process, so isolation cannot protect
a training loop running in another thread: :func:`check_thread` refuses to isolate
outside the main thread.
"""

from __future__ import annotations

import ctypes
import random
import sys
import threading
import warnings
from typing import Any

import torch

from .._errors import TorchreproError, TorchreproWarning

_MT_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos
_torch_gen = torch.default_generator


class _NumpyState:
    """Fast save/restore of NumPy's global RandomState, for one bit generator object."""

    def __init__(self, np: Any) -> None:
        self.np = np
        self.rand = np.random.mtrand._rand
        self.bit_generator = self.rand._bit_generator
        self.mt = type(self.bit_generator).__name__ == "MT19937"
        self.address: int | None = None
        self.restored: bytes | None = None  # bytes last restored with an empty Gaussian cache
        if not self.mt:
            return
        try:
            address = int(self.bit_generator.ctypes.state_address)
            _, key, pos, _, _ = self.rand.get_state()
            expected = key.astype("<u4").tobytes() + int(pos).to_bytes(4, sys.byteorder)
            if ctypes.string_at(address, _MT_BYTES) == expected:
                self.address = address
        except Exception:  # another NumPy layout: keep the public path
            self.address = None

    def save(self) -> tuple[str, Any]:
        if not self.mt:
            return ("bitgen", self.bit_generator.state)
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
        if kind == "bitgen":
            self.bit_generator.state = value
        elif kind == "fast" and self.address is not None:
            self.rand.seed(0)  # empties the Gaussian cache; the key is overwritten next
            ctypes.memmove(self.address, value, _MT_BYTES)
            self.restored = value
        else:
            self.rand.set_state(value)
            self.restored = None


_numpy_state: _NumpyState | None = None


def _numpy() -> _NumpyState | None:
    """The saver for NumPy's current global bit generator (rebuilt when it was replaced)."""
    global _numpy_state
    np = sys.modules.get("numpy")
    if np is None:
        return None
    saver = _numpy_state
    if saver is None or saver.np is not np or saver.bit_generator is not _bit_generator(np):
        saver = _numpy_state = _NumpyState(np)
    return saver


def _bit_generator(np: Any) -> Any:
    return np.random.mtrand._rand._bit_generator


Saved = tuple[Any, Any, torch.Tensor, Any, Any]


def _cuda_generators() -> tuple[torch.Generator, ...]:
    """CUDA's default generators when CUDA is initialised, else none (never initialises it)."""
    if not torch.cuda.is_initialized():
        return ()
    return tuple(torch.cuda.default_generators)


def save_globals() -> Saved:
    """The state of ``random``, NumPy's global RNG (if imported), torch CPU, initialised CUDA."""
    np = _numpy()
    cuda = _cuda_generators()
    return (
        random.getstate(),
        (np.bit_generator, np.save()) if np is not None else None,
        _torch_gen.get_state(),
        cuda,
        [gen.get_state() for gen in cuda],
    )


def restore_globals(state: Saved) -> None:
    """Restore what :func:`save_globals` captured."""
    py, np_saved, torch_state, cuda, cuda_states = state
    random.setstate(py)
    if np_saved is not None:
        np = _numpy()
        bit_generator, value = np_saved
        if np is not None and np.bit_generator is bit_generator:
            np.restore(value)
        # else: NumPy's bit generator was replaced meanwhile (set_bit_generator); the new
        # one is the caller's choice and is left as it is.
    _torch_gen.set_state(torch_state)
    for gen, gen_state in zip(cuda, cuda_states, strict=True):
        gen.set_state(gen_state)


_cuda_warned = False


def warn_if_cuda_started() -> None:
    """Warn once when CUDA was initialised while a batch was loaded in this process."""
    global _cuda_warned
    if _cuda_warned or not torch.cuda.is_initialized():
        return
    _cuda_warned = True
    warnings.warn(
        "CUDA was initialised while torchrepro.DataLoader loaded a batch with num_workers=0 "
        "(a dataset using the GPU?): CUDA draws before that point were not seeded per sample "
        "and the training loop's CUDA generator was not saved around that batch. Initialise "
        "CUDA before iterating (e.g. move the model to the GPU first); from now on CUDA "
        "draws in the dataset are seeded per sample and isolated.",
        TorchreproWarning,
        stacklevel=3,
    )


def check_thread(what: str) -> None:
    """Refuse to isolate the global RNGs outside the main thread.

    Raises:
        TorchreproError: called from another thread, naming ``what`` needed isolation.
    """
    if threading.current_thread() is not threading.main_thread():
        raise TorchreproError(
            f"torchrepro.DataLoader was iterated in thread {threading.current_thread().name!r}, "
            f"but {what} draws from the process-wide RNGs (random, numpy.random, torch), "
            "which the training loop in the main thread shares: its draws would change. "
            "Iterate the loader in the main thread, or use num_workers >= 1 (samples are then "
            "loaded in worker processes) and let torchrepro order the samples (no sampler= "
            "that draws from the global RNGs)."
        )
