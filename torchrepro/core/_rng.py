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

from .._errors import RNGStateError, TorchreproWarning
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


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def _xpu_initialized() -> bool:
    xpu = getattr(torch, "xpu", None)
    is_initialized = getattr(xpu, "is_initialized", None)
    return bool(_xpu_available() and callable(is_initialized) and is_initialized())


def get_rng_state() -> dict[str, Any]:
    """Capture the state of every global RNG torchrepro knows about.

    Captures Python ``random``, NumPy's global RNG (when NumPy is importable), torch's
    CPU generator, and MPS when present. CUDA and XPU generators are captured (every
    device, not only the current one) only when this process has already initialised
    CUDA/XPU: a query never initialises a device (which would, for example, make a later
    ``deterministic("strict")`` refuse). A generator of a device that was never
    initialised has drawn nothing since it was seeded; restoring such a state leaves this
    process's device generators as its own seeding left them.

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
        "cuda": list(torch.cuda.get_rng_state_all()) if _cuda_initialized() else [],
        "mps": torch.mps.get_rng_state() if _mps_available() else None,
        "xpu": list(torch.xpu.get_rng_state_all()) if _xpu_initialized() else [],
    }


def _check_tensor(value: object, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise RNGStateError(
            f"RNG state entry {where!r} must be a 1-D uint8 tensor, got "
            + (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
        )
    return value


def _numpy_tuple(np: Any, numpy_state: dict[str, Any]) -> tuple[Any, ...]:
    return (
        numpy_state.get("bit_generator", "MT19937"),
        np.asarray(numpy_state["keys"], dtype=np.uint32),
        int(numpy_state["pos"]),
        int(numpy_state.get("has_gauss", 0)),
        float(numpy_state.get("cached_gaussian", 0.0)),
    )


def _check_python(python: object) -> tuple[Any, ...]:
    expected = "RNG state entry 'python' must be [version, [625 ints], gauss]"
    if not (
        isinstance(python, (list, tuple))
        and len(python) == 3
        and isinstance(python[1], (list, tuple))
    ):
        raise RNGStateError(expected)
    version, internal, gauss = python
    value = (version, tuple(internal), gauss)
    try:
        random.Random().setstate(value)  # a scratch generator: validates, changes nothing global
    except (TypeError, ValueError, OverflowError) as exc:
        raise RNGStateError(f"{expected}: {exc}") from exc
    return value


def _check_device_states(states: list[Any], key: str, current: Any) -> None:
    """Each state must have the layout of this build's generator for that device."""
    for i, t in enumerate(states):
        if current is not None and i < len(current) and t.numel() != current[i].numel():
            raise RNGStateError(
                f"RNG state entry '{key}[{i}]' has {t.numel()} bytes; this torch build's "
                f"{key.upper()} generator state has {current[i].numel()} (another torch build?)"
            )


def _validate(state: object) -> dict[str, Any]:
    """``state`` as a dict, checked deeply: every domain is tried on a scratch generator."""
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
    _check_python(state.get("python"))
    cpu = _check_tensor(state.get("torch"), "torch")
    try:
        torch.Generator().set_state(cpu)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise RNGStateError(
            f"RNG state entry 'torch' is not a CPU generator state of this torch build "
            f"({cpu.numel()} bytes): {exc}"
        ) from exc
    for key in ("cuda", "xpu"):
        value = state.get(key, [])
        if not isinstance(value, (list, tuple)):
            raise RNGStateError(f"RNG state entry {key!r} must be a list of uint8 tensors")
        for i, t in enumerate(value):
            _check_tensor(t, f"{key}[{i}]")
    if _cuda_initialized():
        current = [g.get_state() for g in torch.cuda.default_generators]
        _check_device_states(list(state.get("cuda", [])), "cuda", current)
    if _xpu_initialized():
        _check_device_states(list(state.get("xpu", [])), "xpu", torch.xpu.get_rng_state_all())
    if state.get("mps") is not None:
        _check_tensor(state["mps"], "mps")
        if _mps_available():
            _check_device_states([state["mps"]], "mps", [torch.mps.get_rng_state()])
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        if not (isinstance(numpy_state, dict) and "keys" in numpy_state and "pos" in numpy_state):
            raise RNGStateError(
                "RNG state entry 'numpy' must be a dict with 'keys' and 'pos', or None"
            )
        np = _numpy()
        if np is not None:
            try:
                np.random.RandomState().set_state(_numpy_tuple(np, numpy_state))
            except Exception as exc:
                raise RNGStateError(
                    f"RNG state entry 'numpy' is not a NumPy MT19937 state: {exc}"
                ) from exc
    return state


def rng_state_problems(state: dict[str, Any]) -> list[str]:
    """Why ``state`` does not fit this machine's devices; empty when it fits.

    A state without CUDA/XPU entries (captured before the device was initialised) fits
    any machine.

    Raises:
        RNGStateError, TypeError: ``state`` is malformed (see :func:`set_rng_state`).
    """
    state = _validate(state)
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n_xpu = torch.xpu.device_count() if _xpu_available() else 0
    problems = []
    saved_cuda, saved_xpu = len(state.get("cuda", [])), len(state.get("xpu", []))
    if saved_cuda and saved_cuda != n_cuda:
        problems.append(f"it holds {saved_cuda} CUDA device state(s), this machine has {n_cuda}")
    if saved_xpu and saved_xpu != n_xpu:
        problems.append(f"it holds {saved_xpu} XPU device state(s), this machine has {n_xpu}")
    if (state.get("mps") is not None) != _mps_available():
        problems.append("MPS is present on one machine only")
    if state.get("numpy") is not None and _numpy() is None:
        problems.append("it holds a NumPy state but NumPy is not installed here")
    return problems


def _apply(state: dict[str, Any]) -> None:
    for setter in _SETTERS:
        setter(state)


def _rollback(state: dict[str, Any]) -> None:
    """Put back every domain that can be put back (one failing must not stop the others)."""
    for setter in _SETTERS:
        with contextlib.suppress(Exception):
            setter(state)


def _set_python(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(internal), gauss))


def _set_numpy(state: dict[str, Any]) -> None:
    np = _numpy()
    numpy_state = state.get("numpy")
    if numpy_state is not None and np is not None:
        np.random.set_state(_numpy_tuple(np, numpy_state))


def _set_torch(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])


def _set_devices(state: dict[str, Any]) -> None:
    cuda_states = list(state.get("cuda", []))
    # torch.cuda.set_rng_state defers to CUDA's initialisation when CUDA is not up yet.
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in range(min(len(cuda_states), n_cuda)):
        torch.cuda.set_rng_state(cuda_states[device], device)
    xpu_states = list(state.get("xpu", []))
    for device in range(min(len(xpu_states), torch.xpu.device_count() if _xpu_available() else 0)):
        torch.xpu.set_rng_state(xpu_states[device], device)
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(state["mps"])


_SETTERS = (_set_python, _set_numpy, _set_torch, _set_devices)


def set_rng_state(state: dict[str, Any], *, strict: bool = True) -> None:
    """Restore a state captured by :func:`get_rng_state`, exactly, or change nothing.

    Every domain is validated first (each on a scratch generator of its kind); only then
    are the global RNGs set. If setting one fails anyway, every RNG is put back as it
    was before the call: it never leaves Python's RNG restored and torch's not.

    Args:
        state: the dict returned by :func:`get_rng_state` (possibly through
            ``torch.save``/``torch.load``).
        strict: when the state was captured on a machine with other devices (another
            number of CUDA/XPU devices, MPS, or NumPy present on one side only), raise.
            With ``strict=False``, restore what this machine has and warn about the rest.

    Raises:
        RNGStateError: the state is of an unknown version, malformed (another torch
            build's generator layout, wrong sizes or types), or (strict) does not match
            this machine's devices; no RNG was changed.
        TypeError: ``state`` is not a dict, or ``strict`` is not a bool.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__} {strict!r}")
    problems = rng_state_problems(state)
    if problems:
        message = "RNG state was captured on a machine with other devices: " + "; ".join(problems)
        if strict:
            raise RNGStateError(message + ". Pass strict=False to restore what this machine has.")
        warnings.warn(message + "; restored the rest.", TorchreproWarning, stacklevel=2)
    previous = get_rng_state()
    try:
        _apply(state)
    except BaseException as exc:
        _rollback(previous)
        if isinstance(exc, Exception):
            raise RNGStateError(
                f"restoring the RNG state failed, every RNG was put back as it was: {exc}"
            ) from exc
        raise


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
