"""Capture and restore every global RNG: Python, NumPy, torch CPU, CUDA, MPS, XPU.

The state is a plain, versioned dict of ints, lists and uint8 tensors, so it survives
``torch.save`` + ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ._errors import RNGStateError, TorchreproWarning
from ._statedict import check_versioned

__all__ = ["get_rng_state", "isolated_rng", "rng_state_problems", "set_rng_state"]

RNG_STATE_VERSION = 1
_KEYS = ("python", "numpy", "torch", "cuda", "mps", "xpu")


def _numpy() -> Any:
    """NumPy if it is importable, else None (NumPy is optional)."""
    np = sys.modules.get("numpy")
    if np is not None:
        return np
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_state(np: Any) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "bit_generator": str(name),
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def get_rng_state() -> dict[str, Any]:
    """Capture the state of every global RNG torchrepro knows about.

    Captures Python ``random``, NumPy's global RNG (when NumPy is importable), torch's
    CPU generator, every CUDA device's generator (all devices, not only the current
    one; this initialises CUDA when it is available), and MPS and XPU when present.

    Returns:
        ``{"version": 1, "python": [...], "numpy": {...} | None, "torch": uint8 tensor,
        "cuda": [uint8 tensor per device], "mps": tensor | None, "xpu": [tensors]}``.

    >>> import random, torch
    >>> state = get_rng_state()
    >>> a = (random.random(), torch.rand(1))
    >>> set_rng_state(state)
    >>> a[0] == random.random() and bool(torch.equal(a[1], torch.rand(1)))
    True
    """
    np = _numpy()
    return {
        "version": RNG_STATE_VERSION,
        "python": _python_state(),
        "numpy": _numpy_state(np) if np is not None else None,
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if _mps_available() else None,
        "xpu": list(torch.xpu.get_rng_state_all()) if _xpu_available() else [],
    }


def _check_tensor(value: object, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise RNGStateError(
            f"RNG state entry {where!r} must be a uint8 tensor, got {type(value).__name__}"
        )
    return value


def _validate(state: object) -> dict[str, Any]:
    state = dict(
        check_versioned(
            state,
            what="RNG",
            version=RNG_STATE_VERSION,
            made_by="torchrepro.get_rng_state()",
            error=RNGStateError,
        )
    )
    unknown = set(state) - {"version", *_KEYS}
    if unknown:
        raise RNGStateError(f"RNG state has unknown keys {sorted(unknown)}")
    python = state.get("python")
    if not (
        isinstance(python, (list, tuple))
        and len(python) == 3
        and isinstance(python[1], (list, tuple))
    ):
        raise RNGStateError("RNG state entry 'python' must be [version, [625 ints], gauss]")
    _check_tensor(state.get("torch"), "torch")
    for key in ("cuda", "xpu"):
        value = state.get(key, [])
        if not isinstance(value, (list, tuple)):
            raise RNGStateError(f"RNG state entry {key!r} must be a list of uint8 tensors")
        for i, t in enumerate(value):
            _check_tensor(t, f"{key}[{i}]")
    if state.get("mps") is not None:
        _check_tensor(state["mps"], "mps")
    numpy_state = state.get("numpy")
    if numpy_state is not None and not (isinstance(numpy_state, dict) and "keys" in numpy_state):
        raise RNGStateError("RNG state entry 'numpy' must be a dict with 'keys', or None")
    return state


def rng_state_problems(state: dict[str, Any]) -> list[str]:
    """Why ``state`` does not fit this machine's devices; empty when it fits.

    Raises:
        RNGStateError, TypeError: ``state`` is malformed (see :func:`set_rng_state`).
    """
    state = _validate(state)
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n_xpu = torch.xpu.device_count() if _xpu_available() else 0
    problems = []
    if len(state.get("cuda", [])) != n_cuda:
        problems.append(
            f"it holds {len(state.get('cuda', []))} CUDA device state(s), this machine has {n_cuda}"
        )
    if len(state.get("xpu", [])) != n_xpu:
        problems.append(
            f"it holds {len(state.get('xpu', []))} XPU device state(s), this machine has {n_xpu}"
        )
    if (state.get("mps") is not None) != _mps_available():
        problems.append("MPS is present on one machine only")
    if state.get("numpy") is not None and _numpy() is None:
        problems.append("it holds a NumPy state but NumPy is not installed here")
    return problems


def set_rng_state(state: dict[str, Any], *, strict: bool = True) -> None:
    """Restore a state captured by :func:`get_rng_state`, exactly.

    Args:
        state: the dict returned by :func:`get_rng_state` (possibly through
            ``torch.save``/``torch.load``).
        strict: when the state was captured on a machine with other devices (another
            number of CUDA/XPU devices, MPS, or NumPy present on one side only), raise.
            With ``strict=False``, restore what this machine has and warn about the rest.

    Raises:
        RNGStateError: the state is of an unknown version, malformed, or (strict) does
            not match this machine's devices.
        TypeError: ``state`` is not a dict.
    """
    problems = rng_state_problems(state)
    if problems:
        message = "RNG state was captured on a machine with other devices: " + "; ".join(problems)
        if strict:
            raise RNGStateError(message + ". Pass strict=False to restore what this machine has.")
        warnings.warn(message + "; restored the rest.", TorchreproWarning, stacklevel=2)
    np = _numpy()
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(internal), gauss))
    numpy_state = state.get("numpy")
    if numpy_state is not None and np is not None:
        np.random.set_state(
            (
                numpy_state.get("bit_generator", "MT19937"),
                np.asarray(numpy_state["keys"], dtype=np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state.get("has_gauss", 0)),
                float(numpy_state.get("cached_gaussian", 0.0)),
            )
        )
    torch.set_rng_state(state["torch"])
    cuda_states = list(state.get("cuda", []))
    for device in range(
        min(len(cuda_states), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ):
        torch.cuda.set_rng_state(cuda_states[device], device)
    xpu_states = list(state.get("xpu", []))
    for device in range(min(len(xpu_states), torch.xpu.device_count() if _xpu_available() else 0)):
        torch.xpu.set_rng_state(xpu_states[device], device)
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(state["mps"])


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without changing any global RNG: the state is restored on exit.

    Restores also when the block raises.

    >>> import torch
    >>> before = torch.get_rng_state()
    >>> with isolated_rng():
    ...     _ = torch.rand(10)
    >>> bool(torch.equal(before, torch.get_rng_state()))
    True
    """
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
