"""Bitwise resume: :func:`save_checkpoint` and :func:`load_checkpoint`.

This module is the policy: what a checkpoint holds, how ranks agree before anything
happens, and the order of checks so that a load either restores everything or changes
nothing it could have checked first. The file format (header, checksum, atomic write,
streaming read) is :mod:`torchrepro.checkpoint._file`'s. Objects are known only through
``state_dict()``/``load_state_dict()``.

Under torch.distributed every step that needs the other ranks is an exchange through the
process group's store with a bounded wait (``TORCHREPRO_DIST_TIMEOUT``, default 300 s):
the ranks first agree on the operation, the path and each rank's local error, before any
collective (FSDP's ``state_dict()`` may be one), so a rank that raised, returned early or
passed another path makes every rank fail with a message that names it, instead of a hang.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .._errors import CheckpointError, RNGStateError, TorchreproWarning
from .._version import __version__
from ..core import _dist, _envvars, _runinfo
from ..core._compiled import ORIG_PREFIX, unwrap
from ..core._determinism import current_settings
from ..core._rng import get_rng_state, rng_state_problems, set_rng_state
from ..core._seed import seed_from_env, seed_streams
from ..env._diff import diff_fingerprints
from ..env._fingerprint import fingerprint
from . import _file
from ._file import FORMAT, FORMAT_VERSION, MAGIC

__all__ = [
    "Stateful",
    "check_objects",
    "check_path",
    "keep",
    "load_checkpoint",
    "load_with_meta",
    "save_checkpoint",
    "save_with_meta",
]
__all__ += ["FORMAT_VERSION", "MAGIC", "read_checkpoint"]  # the format's names, for old imports

log = logging.getLogger("torchrepro")


@runtime_checkable
class Stateful(Protocol):
    """Anything checkpointable: modules, optimizers, schedulers, loaders, your own classes."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def _qualified(obj: object) -> str:
    kind = type(obj)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    module = kind.__module__
    if module.startswith("torch.utils.data."):
        module = "torch.utils.data"  # the public name, not the private file it lives in
    return f"{module}.{kind.__qualname__}"


def check_objects(objects: Mapping[str, object]) -> dict[str, Any]:
    """The objects to checkpoint: ``None`` ones are skipped; the rest must be Stateful.

    A compiled module (``torch.compile``'s wrapper) is replaced by the module it wraps,
    which holds the same parameters: its state dict has the module's own keys, without
    ``_orig_mod.``, so a checkpoint loads into the compiled and the eager model alike.
    """
    kept = {}
    for name, obj in objects.items():
        if obj is None:
            continue
        if not isinstance(obj, Stateful):
            hint = ""
            if isinstance(obj, torch.utils.data.DataLoader):
                hint = (
                    ": torch's DataLoader cannot save its position; use torchrepro.DataLoader "
                    "(same arguments), which can"
                )
            raise TypeError(
                f"checkpoint object {name}= must have state_dict() and load_state_dict() (or be "
                f"None to skip it), got {_qualified(obj)}{hint}"
            )
        kept[name] = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
    return kept


def _without_orig_prefix(saved: object) -> object:
    """A module state saved from a compiled wrapper (every key ``_orig_mod.``-prefixed, as
    ``torch.compile(m).state_dict()`` gives), renamed in place to the module's own keys."""
    if (
        isinstance(saved, dict)
        and saved
        and all(isinstance(k, str) and k.startswith(ORIG_PREFIX) for k in saved)
    ):
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(saved, ORIG_PREFIX)
    return saved


def check_path(path: object, *, none: str = "") -> Path:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(
            f"path must be a str or os.PathLike naming the checkpoint file{none}, got "
            f"{type(path).__name__} {path!r}"
        )
    if not os.fspath(path):
        raise ValueError("path must name the checkpoint file, got an empty string")
    return Path(path)


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint's content and the hex digest of its payload (see :mod:`._file`)."""
    return _file.read(path)


# ----------------------------------------------------------------------------- agreement


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(raw: bytes) -> Any:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _verdict(call: str, every: list[dict[str, Any]]) -> str | None:
    """Why the ranks cannot go on together (the same message for every rank), or None."""
    failures = [f"rank {r}: {v['error']}" for r, v in enumerate(every) if v.get("error")]
    if failures:
        return f"{call} failed on another rank; " + "; ".join(failures)
    if len({v.get("op") for v in every}) > 1:
        listed = ", ".join(f"rank {r} in {v.get('op')}" for r, v in enumerate(every))
        return f"ranks are in different checkpoint calls ({listed})"
    if len({v.get("path") for v in every}) > 1:
        listed = ", ".join(f"rank {r}: {v.get('path')!r}" for r, v in enumerate(every))
        return (
            f"{call}: ranks passed different paths ({listed}); every rank must pass the same "
            "path (rank 0 writes it, every rank reads it)"
        )
    if len({v.get("digest") for v in every}) > 1:
        ranks = [str(r) for r, v in enumerate(every) if v.get("digest") != every[0].get("digest")]
        return (
            f"{call}: ranks read different checkpoints (ranks {', '.join(ranks)} differ from "
            "rank 0): every rank must see the same file, e.g. on a shared filesystem"
        )
    return None


def _settle(
    call: str, local: BaseException | None, **facts: Any
) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Agree with the other ranks on ``facts`` and on each rank's error, before going on.

    ``call`` names the operation and its path for messages (``save_checkpoint('c.pt')``).
    Rank 0 gathers every rank's facts and decides; when any rank failed, or the ranks are
    in different calls, passed different paths or read different files, every rank
    raises: the failing rank its own exception, the others a CheckpointError naming each
    failing rank and its cause. Returns rank 0's facts (what rank 0 decides for all) and,
    on rank 0, every rank's facts.
    """
    mine = {"error": None if local is None else _describe(local), **facts}

    def decide(raws: list[bytes]) -> bytes:
        every = [_loads(r) for r in raws]
        return _dumps({"failure": _verdict(call, every), "rank0": every[0]})

    if _dist.is_distributed():
        try:
            raw, raws = _dist.agree(_dumps(mine), decide)
        except _dist.ExchangeTimeoutError as exc:
            raise CheckpointError(
                f"rank {_dist.group_rank()} waited in {call} for the other ranks: {exc}. Every "
                f"rank must call it, with the same path (a save under `if rank == 0:` leaves "
                f"the others out); set {_envvars.DIST_TIMEOUT} to wait longer"
            ) from exc
        decision = _loads(raw)
        every = None if raws is None else [_loads(r) for r in raws]
    else:
        every = [mine]
        decision = {"failure": _verdict(call, every), "rank0": mine}
    if local is not None:
        raise local
    if decision["failure"] is not None:
        raise CheckpointError(decision["failure"])
    return decision["rank0"], every


def _agree(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order: a collective of the backend (``[value]`` alone).

    For callers already inside a framework's own collective step (the Lightning
    integration gathers every rank's RNG state with it); checkpoint calls use
    :func:`_settle`, which is bounded and goes through the store.
    """
    if not _dist.is_distributed():
        return [value]
    gathered: list[Any] = [None] * _dist.world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _attempt(step: Any) -> tuple[Any, BaseException | None]:
    """``step()``'s result and None, or None and the exception it raised."""
    try:
        return step(), None
    except Exception as exc:
        return None, exc


# ----------------------------------------------------------------------------- saving


def _build_states(objects: Mapping[str, Any]) -> dict[str, Any]:
    states = {}
    for name, obj in objects.items():
        try:
            states[name] = obj.state_dict()
        except Exception as exc:
            raise CheckpointError(f"{name}.state_dict() failed: {_describe(exc)}") from exc
        problem = _file.unloadable(states[name], f"{name}.state_dict()")
        if problem is not None:
            raise CheckpointError(f"{name}= cannot be saved: {problem}")
    return states


def save_with_meta(
    path: object, objects: Mapping[str, Any], extra: object, meta: dict[str, Any]
) -> None:
    def check_arguments() -> tuple[Path, dict[str, Any]]:
        target = check_path(path)
        kept = check_objects(objects)
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
        problem = _file.unloadable(extra or {}, "extra")
        if problem is not None:
            raise TypeError(f"extra cannot be saved: {problem}")
        return target, kept

    checked, error = _attempt(check_arguments)
    shown = str(path) if isinstance(path, (str, os.PathLike)) else repr(path)
    call = f"save_checkpoint({shown!r})"
    # Before any collective: the ranks agree on the call, the path and each one's error.
    _settle(call, error, op="save_checkpoint", path=shown)
    target, kept = checked
    # Every rank builds the state dicts (FSDP and ZeRO build them collectively) and
    # gives its RNG state; rank 0 alone writes.
    states, error = _attempt(lambda: (_build_states(kept), get_rng_state()))
    _rank0, every = _settle(call, error, rng=None if states is None else states[1])
    error = None
    if every is not None:  # rank 0
        rng = [v["rng"] for v in every]

        def write() -> None:
            content = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "torchrepro_version": __version__,
                "objects": states[0],
                "extra": dict(extra or {}),  # type: ignore[call-overload]
                "rng": rng,
                "world_size": _dist.world_size(),
                "determinism": current_settings(),
                "fingerprint": fingerprint(),
                "meta": meta,
            }
            _file.write(target, content)

        _none, error = _attempt(write)
    # Nobody reads or exits before the file is complete, and a failure on rank 0 reaches
    # every rank instead of leaving them waiting.
    _settle(call, error)


def save_checkpoint(
    path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None, **objects: Any
) -> None:
    """Save ``objects`` and every RNG state so that a resumed run is bitwise identical.

    The file holds each object's ``state_dict()``, ``extra``, every rank's RNG state
    (:func:`torchrepro.get_rng_state`), the determinism settings, the environment
    fingerprint, the torchrepro version and a format version. The write is atomic: after a
    crash or ``kill -9`` at any instant, ``path`` holds the previous complete checkpoint or
    the new one, and the next save or load removes the temporary file a killed save left.
    A checksum lets :func:`load_checkpoint` detect a torn or corrupted file. When ``path``
    is a symlink, its target is replaced and the link kept.

    Nothing is written that :func:`load_checkpoint` could not read back: anything
    ``torch.load(weights_only=True)`` refuses (NumPy arrays and scalars, datetimes,
    dataclasses, enums, paths, ``range``, ``defaultdict``, ``torch.Generator``...) in
    ``extra`` or in an object's ``state_dict()`` is refused, naming its key path and type
    (e.g. ``extra['acc']: numpy.float64``) and what to store instead. Nothing is converted
    silently: a converted value would not load back as what was saved.

    Under torch.distributed, call it on every rank with the same path: rank 0 writes the
    objects' state as rank 0 sees it (for sharded FSDP state, pass objects whose
    ``state_dict()`` returns the full state on rank 0), every rank's RNG state is gathered.
    The ranks first agree on the path and on each rank's errors; a rank that fails, calls
    with another path or never calls makes every rank raise (within
    ``TORCHREPRO_DIST_TIMEOUT`` seconds, default 300), naming the rank and the cause.

    Args:
        path: the file to write (its directory is created).
        extra: a plain dict (ints, floats, strings, lists, tensors) returned by
            :func:`load_checkpoint`, e.g. ``{"step": step}``.
        **objects: named objects with ``state_dict()``/``load_state_dict()``; ``None``
            values are skipped (e.g. ``scheduler=None``).

    Raises:
        TypeError: ``path`` is not a path, an object lacks the protocol, ``extra`` is not a
            dict or holds a value that could not be loaded back.
        CheckpointError: an object's ``state_dict()`` failed or holds such a value; another
            rank failed, passed another path, or did not arrive in time.
        OSError: the file could not be written (the previous checkpoint is intact).

    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_checkpoint(f"{d}/ckpt.pt", model=model, extra={"step": 3})
    ...     load_checkpoint(f"{d}/ckpt.pt", model=model)
    {'step': 3}
    """
    save_with_meta(path, objects, extra, meta={})


# ----------------------------------------------------------------------------- loading


def _warn_environment(path: Path, saved: Any) -> None:
    if not isinstance(saved, dict):
        return
    try:
        changed = [d for d in diff_fingerprints(saved, fingerprint()) if d.changes_results]
    except Exception:  # a fingerprint from another version: nothing to compare reliably
        return
    if changed:
        lines = "\n".join(f"  {d}" for d in changed)
        warnings.warn(
            f"checkpoint {str(path)!r} was saved in an environment that differs in ways that can "
            f"change results; the resumed run may not be bitwise identical:\n{lines}",
            TorchreproWarning,
            stacklevel=4,
        )


def _check_structure(path: Path, content: dict[str, Any]) -> None:
    """The parts every later step relies on have the right types (before anything is used)."""
    where = repr(str(path))
    expected = {"objects": dict, "extra": dict, "meta": dict, "rng": list, "world_size": int}
    for key, kind in expected.items():
        value = content.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"checkpoint {where} is malformed: {key!r} must be a {kind.__name__}, got "
                f"{type(value).__name__} (was it written by torchrepro?)"
            )
    if not content["rng"] or content["world_size"] < 1:
        raise CheckpointError(f"checkpoint {where} is malformed: it holds no RNG state")
    steps = content["meta"].get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise CheckpointError(f"checkpoint {where} is malformed: meta 'steps' is {steps!r}")


def _check_world_size(path: Path, content: dict[str, Any], strict: bool) -> bool:
    """Whether the world size changed since the save (raises under ``strict``)."""
    saved_world, world = content["world_size"], _dist.world_size()
    if saved_world == world:
        return False
    message = f"checkpoint {str(path)!r} was saved with world size {saved_world}, this run has world size {world}"
    if strict:
        raise CheckpointError(
            message + "; pass strict=False to re-derive each rank's random streams from the seed "
            "and continue at the same global sample position"
        )
    warnings.warn(
        message + "; each rank's random streams are re-derived from the seed (not the saved ones)",
        TorchreproWarning,
        stacklevel=5,
    )
    return True


def _rng_for_this_rank(content: dict[str, Any], resized: bool) -> Any:
    states = content["rng"]
    return states[0] if resized else states[min(_dist.group_rank(), len(states) - 1)]


def _check_rng(path: Path, content: dict[str, Any], strict: bool, resized: bool) -> None:
    """The RNG state this rank will restore is valid and (strict) fits this machine."""
    try:
        problems = rng_state_problems(_rng_for_this_rank(content, resized))
    except (RNGStateError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds an RNG state this machine cannot restore: {exc}"
        ) from exc
    if problems and strict:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved on a machine with other devices: {'; '.join(problems)}. "
            "Pass strict=False to restore the RNG states this machine has."
        )
    if resized and seed_from_env() is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: re-deriving random streams for the new world size needs "
            f"the run's seed; call torchrepro.seed_everything() first or set {_envvars.SEED}"
        )


def _check_names(
    path: Path, saved: dict[str, Any], objects: Mapping[str, Any], strict: bool
) -> None:
    missing = sorted(set(objects) - set(saved))
    unexpected = sorted(set(saved) - set(objects))
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"not in the file: {', '.join(missing)}")
    if unexpected:
        parts.append(f"in the file but not passed: {', '.join(unexpected)}")
    message = f"checkpoint {str(path)!r} objects do not match ({'; '.join(parts)})"
    if strict:
        raise CheckpointError(message + "; pass strict=False to load the names both have")
    warnings.warn(message + "; loaded the names both have", TorchreproWarning, stacklevel=5)


def _plain_loading(module: torch.nn.Module) -> bool:
    """Whether ``module.load_state_dict`` takes keys as they are (no override, no key hooks)."""
    if type(module).load_state_dict is not torch.nn.Module.load_state_dict:
        return False
    return not any(
        getattr(m, "_load_state_dict_pre_hooks", None)
        or getattr(m, "_load_state_dict_post_hooks", None)
        for m in module.modules()
    )


def _check_module(path: Path, name: str, module: torch.nn.Module, saved: object) -> None:
    """What ``Module.load_state_dict`` would refuse only after copying other tensors.

    Shapes are compared for the keys both have; missing and unexpected keys only where
    the module loads keys as they are (a custom ``load_state_dict`` or a load hook may
    rename or add them).
    """
    where = f"loading {name}= from checkpoint {str(path)!r} failed"
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{where}: the saved state is a {type(saved).__name__}, not a dict")
    own = module.state_dict()
    if _plain_loading(module):
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: missing keys {missing}, unexpected keys {unexpected}; nothing was loaded"
            )
    for key, value in own.items():
        other = saved.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(other, torch.Tensor)
            and value.shape != other.shape
        ):
            raise CheckpointError(
                f"{where}: size mismatch for {key}: the checkpoint has shape "
                f"{tuple(other.shape)}, this model {tuple(value.shape)}; nothing was loaded"
            )


def _restore_rng(path: Path, content: dict[str, Any], strict: bool, resized: bool) -> None:
    state = _rng_for_this_rank(content, resized)
    try:
        if not resized:
            set_rng_state(state, strict=strict)
            return
        seed = seed_from_env()
        assert seed is not None  # checked by _check_rng before anything was loaded
        set_rng_state(state, strict=False)  # CUDA/MPS layout from rank 0; then reseed per rank
        seed_streams(
            seed, "resume", _dist.world_size(), _dist.group_rank(), content["meta"].get("steps", 0)
        )
    except RNGStateError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from exc


def load_with_meta(
    path: object, objects: Mapping[str, Any], strict: object
) -> tuple[dict[str, Any], dict[str, Any]]:
    def read() -> tuple[Path, dict[str, Any], dict[str, Any], str]:
        source = check_path(path)
        _check_bool(strict, "strict")
        kept = check_objects(objects)
        _file.remove_stale_temps(source)
        content, digest = _file.read(source)
        _check_structure(source, content)
        return source, kept, content, digest

    done, error = _attempt(read)
    shown = str(path) if isinstance(path, (str, os.PathLike)) else repr(path)
    call = f"load_checkpoint({shown!r})"
    # Before any collective: same call, same path, every rank could read it.
    _settle(call, error, op="load_checkpoint", path=shown, digest=None if done is None else done[3])
    source, kept, content, _digest = done
    assert isinstance(strict, bool)
    saved: dict[str, Any] = {
        name: _without_orig_prefix(state) if isinstance(kept.get(name), torch.nn.Module) else state
        for name, state in content["objects"].items()
    }

    def validate() -> bool:
        resized = _check_world_size(source, content, strict)
        _check_rng(source, content, strict, resized)
        _check_names(source, saved, kept, strict)
        return resized

    def check_modules() -> None:  # apart: a sharded module's state_dict() is a collective
        for name, obj in kept.items():
            if name in saved and isinstance(obj, torch.nn.Module):
                _check_module(source, name, obj, saved[name])

    # Everything that can be checked is checked on every rank before any object is touched.
    resized, error = _attempt(validate)
    _settle(call, error)
    _none, error = _attempt(check_modules)
    _settle(call, error)
    _warn_environment(source, content.get("fingerprint"))
    loaded: list[str] = []

    def load_objects() -> None:
        with _dist.world_size_change_allowed() if resized else contextlib.nullcontext():
            for name, obj in kept.items():
                if name not in saved:
                    continue
                try:
                    obj.load_state_dict(saved[name])
                except Exception as exc:
                    before = (
                        f" ({', '.join(n + '=' for n in loaded)} already loaded)" if loaded else ""
                    )
                    raise CheckpointError(
                        f"loading {name}= from checkpoint {str(source)!r} failed{before}: {exc}"
                    ) from exc
                loaded.append(name)

    _none, error = _attempt(load_objects)
    _settle(call, error)
    _restore_rng(
        source, content, strict, resized
    )  # last: nothing may draw between this and the loop
    return dict(content["extra"]), dict(content["meta"])


def load_checkpoint(
    path: str | os.PathLike[str], *, strict: bool = True, **objects: Any
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` into ``objects``, then the RNG state.

    The file is verified against its checksum while it is read (in chunks, so the peak
    memory is about that of ``torch.load``), unpickled with ``torch.load(weights_only=True)``,
    and checked whole before any object is touched: the RNG state this rank will restore
    (tried on scratch generators), the world size, the names, and each module's keys and
    shapes. Then every object is loaded, and the RNG state last, so nothing consumes
    randomness between the restore and the training loop. A temporary file left by a
    killed save of the same file is removed.

    Under torch.distributed, call it on every rank with the same path: the ranks agree
    on the path and on each rank's errors before any collective, so a rank that cannot
    read the file makes every rank raise, naming it.

    Args:
        path: the checkpoint file.
        strict: raise when the names passed and the names saved differ, when the saved RNG
            state does not fit this machine's devices, or when the world size differs. With
            ``strict=False``, load what matches and warn.
        **objects: the same names that were saved; ``None`` values are skipped.

    Returns:
        The ``extra`` dict saved with the checkpoint (``{}`` if none).

    Raises:
        TypeError: ``path`` is not a path, ``strict`` is not a bool, an object lacks the
            protocol.
        CheckpointError: the file is missing, not a torchrepro checkpoint, of an unknown
            format version, truncated or corrupted; it holds an RNG state this machine
            cannot restore; names do not match (strict); an object's ``load_state_dict``
            failed (the message names the object, and those loaded before it); another
            rank failed or did not arrive in time.

    Warns:
        TorchreproWarning: the saving machine's fingerprint differs in ways that change
            numerics (the reasons ``torchrepro env --diff`` gives).
    """
    extra, meta = load_with_meta(path, objects, strict)
    _runinfo.note("resumed_from", meta.get("steps"))  # for the trace header (None: unknown)
    return extra


def keep(path: Path, steps: int) -> None:
    """``TORCHREPRO_KEEP_CHECKPOINTS=1``: keep this save as ``<path>.step<K>`` (a hard link).

    ``torchrepro check`` sets it on its reference run, so a divergence at step N can be
    re-run from the last checkpoint before N. Saves replace the file, never rewrite it, so
    the link keeps this save's bytes; it falls back to a copy where links fail.
    """
    kept = path.with_name(f"{path.name}.step{steps}")
    with contextlib.suppress(FileNotFoundError):
        kept.unlink()
    try:
        os.link(path, kept)
    except OSError:
        kept.write_bytes(path.read_bytes())
