"""Trace: exact per-step checksums of the loss, parameters, buffers, gradients and batch.

One JSON line per traced step is appended and flushed to the file, so a crash loses at
most the step in flight. Each writing process first writes a header with the facts it
observed about itself (:mod:`torchrepro.core._runinfo`) and its environment fingerprint. The
format is owned by :mod:`torchrepro.trace._file`; ``torchrepro check`` compares the
traces of several runs with :func:`torchrepro.trace._compare.compare_traces`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import logging
import numbers
import os
import struct
import sys
import tempfile
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .._errors import TraceError
from .._version import __version__
from ..core import _dist, _envvars, _runinfo
from ..core._compiled import unwrap, verify_compiled
from ..core._determinism import requested_mode
from ..core._statedict import check_versioned
from ..env._fingerprint import fingerprint
from ._capture import Capture
from ._checksum import tensor_checksums, tensor_norms
from ._file import (
    TRACE_FORMAT,
    TRACE_VERSION,
    encode,
    fingerprint_digest,
    json_float,
    parse,
)

__all__ = ["Trace"]

STATE_VERSION = 1
_UNRESOLVED = "<unresolved>"
_INT64 = (-(2**63), 2**63 - 1)
log = logging.getLogger("torchrepro")
_precedence_logged = False

# Host-side decoding of a one-element loss from its raw little-endian bytes.
_STRUCT = {torch.float16: "<e", torch.float32: "<f", torch.float64: "<d"}


def _loss_value(dtype: torch.dtype, raw: bytes) -> float | int | None:
    if dtype in _STRUCT:
        return float(struct.unpack(_STRUCT[dtype], raw)[0])
    if dtype == torch.bfloat16:
        return float(struct.unpack("<f", b"\0\0" + raw)[0])
    if dtype == torch.bool:
        return float(raw[0])
    if not dtype.is_floating_point and not dtype.is_complex:
        return int.from_bytes(raw, "little", signed=dtype.is_signed)  # exact, not via float
    return None


@functools.cache
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_tensor(value: object, what: str) -> torch.Tensor:
    """A tensor holding ``value`` exactly: Python ints as int64, other reals as float64."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
        if not _INT64[0] <= number <= _INT64[1]:
            raise ValueError(
                f"{what} must fit in int64 to be recorded exactly, got an int of "
                f"{number.bit_length()} bits; record it as a tensor or a float"
            )
        return torch.tensor(number, dtype=torch.int64)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"{what} must be a torch.Tensor or a real number, got {type(value).__name__}")


def _numpy_leaf(value: object) -> object | None:
    """``value`` as a tensor (or, for object arrays, a nested list) when it is NumPy's.

    NumPy is optional: it is looked up only when it is already imported, since a batch
    cannot hold one of its arrays otherwise. Arrays whose dtype torch lacks become a
    uint8 tensor of their bytes (with the dtype in the path); ``__array__`` objects
    (PIL images) go through ``numpy.asarray``.
    """
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if not isinstance(value, (np.ndarray, np.generic)):
        if not hasattr(value, "__array__") or isinstance(value, type):
            return None
        try:
            value = np.asarray(value)
        except Exception:  # an __array__ that fails is recorded by its type, as before
            return None
    array = np.ascontiguousarray(value)
    if array.dtype.hasobject:
        nested: object = array.tolist()
        return nested
    try:
        return torch.from_numpy(array)
    except TypeError:  # a dtype torch lacks (strings, dates, uint64 on old torch)
        return torch.from_numpy(array.reshape(-1).view(np.uint8).copy())


def _leaves(value: object, path: str, out: list[tuple[str, object]]) -> None:
    """The leaves of a (nested) batch, with their paths, in a deterministic order.

    Tensors, NumPy arrays and scalars (as tensors, by content), ``None``, and ``str``,
    ``bytes``, ``int``, ``float`` (by value) are leaves; anything else not nested in a
    mapping, sequence or dataclass is recorded by its type only (``<Type>``), and the
    batch entry counts it as ``opaque``.
    """
    if (
        isinstance(value, torch.Tensor)
        or value is None
        or isinstance(value, (str, bytes, int, float))
    ):
        out.append((path, value))
    elif isinstance(value, Mapping):
        for key in value:
            _leaves(value[key], f"{path}[{key!r}]", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _leaves(item, f"{path}[{i}]", out)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            _leaves(getattr(value, name), f"{path}.{name}", out)
    elif (array := _numpy_leaf(value)) is not None:
        dtype = getattr(value, "dtype", None)
        _leaves(array, f"{path}<numpy {dtype}>" if dtype is not None else path, out)
    else:
        out.append((path, _Opaque(type(value).__qualname__)))


class _Opaque(str):
    """A leaf recorded by its type only: nothing of its content can be compared."""


def _batch_entry(batch: object) -> dict[str, Any]:
    """One entry for the batch a step consumed: a checksum over every leaf.

    ``opaque``: how many leaves were recorded by their type only (absent when none).
    """
    leaves: list[tuple[str, object]] = []
    _leaves(batch, "batch", leaves)
    tensors = [v for _, v in leaves if isinstance(v, torch.Tensor)]
    checksums = iter(tensor_checksums(tensors))
    h = hashlib.blake2b(digest_size=8)
    opaque = 0
    for path, value in leaves:
        if isinstance(value, torch.Tensor):
            text = f"{path}|{value.dtype}|{tuple(value.shape)}|{next(checksums):016x}"
        elif isinstance(value, _Opaque):
            opaque += 1
            text = f"{path}|<{value}>"
        else:
            text = f"{path}|{type(value).__name__}|{value!r}"
        h.update(text.encode() + b"\0")
    entry = {"name": "batch", "kind": "batch", "checksum": h.hexdigest(), "tensors": len(tensors)}
    if opaque:
        entry["opaque"] = opaque
    return entry


def _members(
    model: torch.nn.Module,
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """``named_parameters()`` and ``named_buffers()`` (same names and order) in one traversal."""
    params: list[tuple[str, torch.Tensor]] = []
    buffers: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        for members, out in ((module._parameters, params), (module._buffers, buffers)):
            for name, t in members.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((dot + name, t))
    return params, buffers


def _entries(
    items: list[tuple[str, str, torch.Tensor | None]], with_norms: bool
) -> list[dict[str, Any]]:
    """One entry per item: name, kind, dtype, shape, checksum (and norm); None stays None."""
    present = [t for _, _, t in items if t is not None]
    checksums = iter(tensor_checksums(present))
    norms = iter(tensor_norms(present) if with_norms else [])
    entries: list[dict[str, Any]] = []
    for name, kind, t in items:
        if t is None:
            entries.append({"name": name, "kind": kind, "checksum": None})
            continue
        entry: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "dtype": _dtype_name(t.dtype),
            "shape": list(t.shape),
            "checksum": f"{next(checksums):016x}",
        }
        if with_norms:
            entry["norm"] = json_float(next(norms))
        entries.append(entry)
    return entries


class Trace:
    """Record exact checksums of a training run, one JSON line per traced step.

    Call :meth:`step` once per optimisation step. On traced steps it records, in this
    order: the loss (its exact bits, value and checksum), the model's state on state
    steps (below), each named tensor, then the batch the step consumed (``batch=``, else
    the last batch a :class:`torchrepro.DataLoader` handed out, if any). Each tensor gets
    an exact 64-bit checksum (:func:`tensor_checksum`, computed on its device); every
    ``norm_every`` steps (and on the first step a process traces) also a norm, for
    reporting magnitudes when runs diverge.

    The model's state is every parameter of ``model`` by name, every buffer (e.g.
    BatchNorm running statistics) and every gradient (with ``grads=True``; a ``None``
    gradient is recorded as such). It is recorded on the first step a process traces, on
    the steps ``n`` with ``n % state_every == 0``, and once more when the trace ends
    (:meth:`close`, the end of a ``with`` block, garbage collection, or interpreter exit)
    right after a traced step that did not record it: an *end* line with the state the
    run ended with. Checksumming the state costs about 10% of an MLP's training step on
    CPU; every 10th step it costs 1%, and two runs that part still disagree at that step's
    loss or batch, or at the next state record. ``torchrepro check`` then re-runs that
    interval with ``TORCHREPRO_TRACE_STATE_EVERY=1`` to name the exact step.

    Each process writing to the file first writes a header line: format version,
    torchrepro and torch versions, rank, world size, ``every``, ``grads``, ``norm_every``,
    the facts it observed (seed, each torchrepro loader's effective ``num_workers``, world
    size, torch threads, the step it resumed from) and its full environment fingerprint
    with a digest (format: :mod:`torchrepro.trace._file`). A fresh ``Trace`` overwrites the
    file at its first traced step; after :meth:`load_state_dict` it continues it instead,
    appending its own header. The file
    stays open (``O_APPEND``, one unbuffered write per traced step) until :meth:`close`,
    the end of a ``with`` block, or garbage collection.

    Under torch.distributed only rank 0 writes, unless ``per_rank=True`` or
    ``TORCHREPRO_TRACE_ALL_RANKS=1``: then every rank writes to ``<path>.rank<r>``. The
    rank is read at the first traced step, so the process group may be initialised after
    the ``Trace`` is created.

    Args:
        path: the trace file. ``TORCHREPRO_TRACE``, when set, replaces it (the same rule
            as :class:`torchrepro.Checkpointer`: ``torchrepro check`` gives each run its
            own file this way, which a path written in the script must not defeat; the
            replacement is logged at INFO once). With ``None`` and no such variable, the
            trace is disabled and :meth:`step` only counts steps.
        every: trace the steps ``n`` with ``n % every == 0``.
        grads: also record every parameter's gradient.
        per_rank: write one file per rank; ``None`` reads ``TORCHREPRO_TRACE_ALL_RANKS``.
        norm_every: record norms on traced steps ``n`` with ``n % norm_every == 0`` (and
            on a process's first traced step). Norms only serve to report magnitudes;
            checksums are recorded on every traced step whatever this is.
        state_every: record the model's state on traced steps ``n`` with
            ``n % state_every == 0`` (1: on every traced step), and on the first step this
            process traces.

    Environment:
        ``TORCHREPRO_TRACE``: replaces ``path``.
        ``TORCHREPRO_TRACE_ALL_RANKS=1``: as ``per_rank=True``.
        ``TORCHREPRO_TRACE_STATE_EVERY``: replaces ``state_every``.

    Raises:
        TypeError, ValueError: an argument or environment variable is invalid.

    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "trace.jsonl")
    >>> trace = Trace(path)
    >>> model = torch.nn.Linear(2, 1)
    >>> trace.step(loss=torch.tensor(0.25), model=model)
    >>> from torchrepro.trace._compare import read_trace
    >>> trace.step(loss=torch.tensor(0.5), model=model)
    >>> [[e["name"] for e in r["entries"]] for r in read_trace(path).records]
    [['loss', 'weight', 'bias'], ['loss']]
    >>> trace.close()  # the end line: the state after step 2
    >>> [e["name"] for e in read_trace(path).end["entries"]]
    ['weight', 'bias']
    """

    _NORM_EVERY = 10
    _STATE_EVERY = 10

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        every: int = 1,
        grads: bool = False,
        per_rank: bool | None = None,
        norm_every: int = _NORM_EVERY,
        state_every: int = _STATE_EVERY,
    ) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"path must be a str, os.PathLike or None, got {type(path).__name__} {path!r}"
            )
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(f"every must be an int >= 1, got {type(every).__name__} {every!r}")
        if every < 1:
            raise ValueError(f"every must be an int >= 1, got {every}")
        if not isinstance(grads, bool):
            raise TypeError(f"grads must be a bool, got {type(grads).__name__} {grads!r}")
        if isinstance(norm_every, bool) or not isinstance(norm_every, int) or norm_every < 1:
            raise ValueError(f"norm_every must be an int >= 1, got {norm_every!r}")
        if isinstance(state_every, bool) or not isinstance(state_every, int) or state_every < 1:
            raise ValueError(f"state_every must be an int >= 1, got {state_every!r}")
        state_override = _envvars.env_int(_envvars.TRACE_STATE_EVERY, low=1)
        if per_rank is not None and not isinstance(per_rank, bool):
            raise TypeError(
                f"per_rank must be a bool or None, got {type(per_rank).__name__} {per_rank!r}"
            )
        if per_rank is None:
            per_rank = _envvars.env_int(_envvars.TRACE_ALL_RANKS, low=0, high=1) == 1
        if path is not None and os.fspath(path) == "":
            raise ValueError("path must be a non-empty path or None, got ''")
        override = _envvars.env_path(_envvars.TRACE)
        base = override if override is not None else (os.fspath(path) if path is not None else None)
        if override is not None and path is not None and os.fspath(path) != override:
            global _precedence_logged
            if not _precedence_logged:
                _precedence_logged = True
                log.info(
                    "torchrepro: %s=%s replaces the Trace path %r given in the script",
                    _envvars.TRACE,
                    override,
                    os.fspath(path),
                )
        self._base: str | None = base
        self._every = every
        self._grads = grads
        self._per_rank = per_rank
        self._norm_every = norm_every
        self._state_every = state_every if state_override is None else state_override
        self._step = 0
        self._file: str | None = _UNRESOLVED if base is not None else None
        if base is not None:
            _runinfo.note_tracing()  # from now on, batches other threads fetch are kept
        self._fresh = True  # overwrite the file at the first write
        self._fd: int | None = None
        self._size = 0  # bytes in the file after the last complete write
        self._headed = False  # this object has written its header
        self._traced = False  # this object has traced a step (its first records norms)
        # After a traced step without the state: (step, model), for the end line. A strong
        # reference: the model must still be there when the trace ends.
        self._unrecorded: tuple[int, torch.nn.Module] | None = None
        self._pid = os.getpid()
        self._model: torch.nn.Module | None = None  # the first model stepped: its header facts
        # TORCHREPRO_LOCALIZE_STEP: per-module checksums of one step (torchrepro check).
        self._capture = Capture.from_env(traced=base is not None)

    def __repr__(self) -> str:
        return (
            f"Trace(path={self._base!r}, every={self._every}, grads={self._grads}, "
            f"state_every={self._state_every}, step={self._step})"
        )

    @property
    def enabled(self) -> bool:
        """Whether a path was given (argument or ``TORCHREPRO_TRACE``)."""
        return self._base is not None

    @property
    def steps(self) -> int:
        """How many times :meth:`step` has been called (including before a resume)."""
        return self._step

    @property
    def path(self) -> str | None:
        """The file this process writes (with the rank suffix), or None when it writes none."""
        return self._resolve()

    def _resolve(self) -> str | None:
        if self._file == _UNRESOLVED:
            assert self._base is not None
            rank = _dist.rank()
            if self._per_rank:
                self._file = f"{self._base}.rank{rank}"
            else:
                self._file = self._base if rank == 0 else None
        return self._file

    def step(
        self,
        loss: object = None,
        model: torch.nn.Module | None = None,
        *,
        batch: object = None,
        **tensors: object,
    ) -> None:
        """Count one step; on traced steps, record and flush one line.

        Arguments are checked only on traced steps (untraced and disabled steps cost a
        counter increment). Reads each tensor's checksum and norm: one host transfer per
        device, which waits for the device's queued work.

        Args:
            loss: the step's loss: a tensor (any device; one element or more) or a number
                (a Python int is recorded exactly, as int64; a float as float64).
            model: record its parameters and buffers (and gradients, with ``grads=True``).
            batch: the batch this step consumed (tensors, possibly nested in tuples,
                lists, dicts or dataclasses). By default, the last batch a
                :class:`torchrepro.DataLoader` handed out; pass it for other loaders.
            **tensors: further tensors (or numbers) to record under their keyword names,
                e.g. ``logits=out``.

        A compiled model (``torch.compile``) is recorded under its module names, without
        the wrapper's ``_orig_mod.`` prefix, and adds no graph break or recompilation: the
        trace only reads tensors after the compiled call. At the first step with a model
        (after its first compiled call), a compiled one is checked to still run with the
        determinism :func:`torchrepro.deterministic` set, traced or not.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``, or a value is not a tensor/number.
            DeterminismError: at the first step with a compiled model,
                :func:`torchrepro.deterministic` was called but something has since turned
                deterministic algorithms or Inductor's deterministic mode off.
            OSError: the trace file cannot be written.
        """
        if self._model is None and isinstance(model, torch.nn.Module):
            self._model = model
            verify_compiled(model, requested_mode())
        self._step += 1
        noted = _runinfo.take_batch()  # every step: a step records only its own batch
        if batch is None:
            batch = noted
        path = None if self._file is None or self._step % self._every else self._resolve()
        if path is not None:
            self._write(path, self._record(loss, model, tensors, batch))
        if self._capture is not None:  # may end the process, after this step's record
            self._capture.after_step(self._step, model, self._resolve())

    def _record(
        self, loss: object, model: object, tensors: dict[str, object], batch: object
    ) -> dict[str, Any]:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        # a record without a model holds all there is: it counts as holding the state
        state = model is None or not self._traced or self._step % self._state_every == 0
        items: list[tuple[str, str, torch.Tensor | None]] = []
        if loss is not None:
            items.append(("loss", "loss", _as_tensor(loss, "loss")))
        if model is not None and state:
            items.extend(self._state_items(model))
        for name, value in tensors.items():
            items.append((name, "tensor", _as_tensor(value, f"tensor {name!r}")))
        with_norms = not self._traced or self._step % self._norm_every == 0
        entries = _entries(items, with_norms)
        for entry, (_, kind, t) in zip(entries, items, strict=True):
            if kind == "loss" and t is not None and t.numel() == 1:
                raw = bytes(t.detach().reshape(1).view(torch.uint8).tolist())
                entry["bits"] = "0x" + int.from_bytes(raw, "little").to_bytes(len(raw), "big").hex()
                value = _loss_value(t.dtype, raw)
                entry["value"] = value if isinstance(value, int) else json_float(value)
        if batch is not None:
            entries.append(_batch_entry(batch))
        self._traced = True
        self._unrecorded = None if state or model is None else (self._step, model)
        if self._unrecorded is not None:
            _ending.add(self)
        return {"step": self._step, "state": state, "entries": entries}

    def _state_items(self, model: torch.nn.Module) -> list[tuple[str, str, torch.Tensor | None]]:
        params, buffers = _members(unwrap(model))
        items: list[tuple[str, str, torch.Tensor | None]] = []
        items.extend((name, "param", p) for name, p in params)
        items.extend((name, "buffer", b) for name, b in buffers)
        if self._grads:
            items.extend((name, "grad", p.grad) for name, p in params)
        return items

    def _write_end(self) -> None:
        """Append the end line: the state the run ends with, after a step that lacked it."""
        pending, self._unrecorded = self._unrecorded, None
        if pending is None or os.getpid() != self._pid:
            return
        step, model = pending
        path = self._resolve()
        if path is None or step != self._step:
            return  # untraced steps (``every``) moved the model on: it is not step's state
        entries = _entries(self._state_items(model), with_norms=True)
        self._write(path, {"end": step, "entries": entries})

    def _header(self) -> dict[str, Any]:
        noted = _runinfo.facts()
        facts = {
            "seed": noted.get("seed"),
            "loaders": noted.get("loaders", []),
            "world_size": _dist.world_size(),
            "torch_threads": torch.get_num_threads(),
            "resumed_from": noted.get("resumed_from"),
            "trace_restored": noted.get("trace_restored"),
            "checkpoint_notes": noted.get("checkpoint_notes"),
        }
        env = fingerprint(self._model)
        return {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "torchrepro": __version__,
            "torch": torch.__version__,
            "rank": _dist.rank(),
            "world_size": _dist.world_size(),
            "every": self._every,
            "grads": self._grads,
            "norm_every": self._norm_every,
            "state_every": self._state_every,
            "facts": facts,
            "fingerprint_digest": fingerprint_digest(env),
            "fingerprint": env,
        }

    def _write(self, path: str, record: dict[str, Any]) -> None:
        data = encode(record)
        if self._fd is None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if self._fresh else 0)
            self._fd = os.open(path, flags, 0o666)
            self._fresh = False
            self._size = os.fstat(self._fd).st_size
        if not self._headed:
            data = encode(self._header()) + data
        # One unbuffered write per traced step: the line is in the OS when step() returns,
        # and there is no Python buffer for a forked DataLoader worker to write twice.
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            # A partial line (e.g. a full disk) would corrupt every later record: cut the
            # file back to its last complete line before reporting the failure.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise OSError(
                exc.errno,
                f"cannot write trace step {record.get('step', record.get('end'))} to {path}: "
                f"{exc.strerror}; the "
                "file was cut back to its last complete line",
            ) from exc
        self._size += len(data)
        self._headed = True

    def close(self) -> None:
        """Write the end line if the last traced step lacked the state, then close the file.

        A later traced step reopens the file, appending (an end line followed by more
        records is ignored by readers). Interpreter exit and garbage collection close
        the trace too.

        >>> Trace(None).close()
        """
        try:
            self._write_end()
        finally:
            self._close_file()

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None or getattr(self, "_unrecorded", None):
            _close_quietly(self)

    def state_dict(self) -> dict[str, Any]:
        """The step count, so a resumed run continues the numbering and the file.

        Returns:
            ``{"version": 1, "step": int, "path": str | None}`` (``path`` is informational).

        >>> Trace(None).state_dict()
        {'version': 1, 'step': 0, 'path': None}
        """
        return {"version": STATE_VERSION, "step": self._step, "path": self._base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the step count, and the trace file.

        The file keeps its headers and the records of steps up to the saved step, so the
        steps a crashed run traced after its checkpoint are dropped and the resumed trace
        equals an uninterrupted run's; this process then appends its own header before its
        first record. The rewrite is atomic (a temporary file, then ``os.replace``). The
        trace's own path is used, not the saved one.

        Args:
            state: the dict from :meth:`state_dict`.

        Raises:
            TypeError: ``state`` is not a dict, or ``step`` is not an int.
            ValueError: unknown version, or a negative step.
            TraceError: the existing file is not a torchrepro trace or is corrupted, or it
                does not reach the saved step (it ends earlier, or is missing while the
                saved step is past the first traced step): continuing would leave a gap.

        >>> t = Trace(None); t.load_state_dict({"version": 1, "step": 41}); t.steps
        41
        """
        check_versioned(state, what="Trace", version=STATE_VERSION, made_by="Trace.state_dict()")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(
                f"Trace state 'step' must be an int >= 0, got {type(step).__name__} {step!r}"
            )
        if step < 0:
            raise ValueError(f"Trace state 'step' must be an int >= 0, got {step}")
        self._step = step
        _runinfo.note("trace_restored", step)  # the step count a checkpoint gave back
        self._unrecorded = None  # the state is being replaced: no end line for the old one
        if self._capture is not None:
            self._capture.sync(step)
        path = self._resolve()
        if path is None:
            return
        self._close_file()
        self._fresh = False
        self._headed = False  # this process appends its own header
        self._traced = False
        expected = (step // self._every) * self._every  # the last step the file must hold
        if not os.path.exists(path):
            if expected > 0:
                raise TraceError(
                    f"cannot continue trace {path} at step {step}: the file does not exist, so "
                    f"steps 1-{step} would be missing; restore the trace file saved with the run, "
                    "or leave the Trace out of the checkpoint to start a new trace"
                )
            return
        _truncate(path, step, expected)


_ending: weakref.WeakSet[Trace] = weakref.WeakSet()  # traces that may owe an end line


def _close_quietly(trace: Trace) -> None:
    """Close ``trace`` at exit or collection, where an exception cannot reach the user."""
    try:
        trace.close()
    except Exception as exc:  # logged: nobody is left to catch it
        log.warning("torchrepro: could not write the end of trace %s: %s", trace.path, exc)


@atexit.register
def _end_traces() -> None:
    for trace in list(_ending):
        _close_quietly(trace)


def _truncate(path: str, step: int, expected: int) -> None:
    """Atomically keep the lines up to the record of ``step``; refuse a gap before it."""
    try:
        parsed = parse(path)
    except TraceError as exc:
        raise TraceError(f"cannot continue trace {path} after a resume: {exc}") from exc
    records, torn = parsed.records, parsed.torn
    kept = [(number, raw) for number, record, raw in records if record["step"] <= step]
    last = next((r["step"] for _, r, _ in reversed(records) if r["step"] <= step), 0)
    if last != expected:
        raise TraceError(
            f"cannot continue trace {path} at step {step}: the file's last traced step up to "
            f"{step} is {last}, expected {expected}; continuing would leave a gap. The trace file "
            "does not belong to this checkpoint (was it replaced, or written with another "
            "`every`?): restore the matching file, or use a new trace path"
        )
    if len(kept) == len(records) and not torn:
        return
    keep_lines = {number for number, _ in kept}
    record_lines = {number for number, _, _ in records}
    limit = max(keep_lines, default=1)  # later lines: dropped records, their headers, a torn line
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".trace-", dir=directory)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as f:
            for number, line in enumerate(src, start=1):
                if number > limit:
                    break
                if number in keep_lines or number not in record_lines:
                    f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
