"""Bitwise resume: :func:`save_checkpoint`, :func:`load_checkpoint` and :class:`Checkpointer`.

Objects are known only through ``state_dict()``/``load_state_dict()``. A checkpoint file is
``MAGIC | sha256(payload) | len(payload) | payload`` where the payload is ``torch.save`` of a
plain dict, so a torn or corrupted file is detected before ``torch.load`` reads it. Writes go
to a temporary file in the same directory, are fsynced, and replace the old file atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from . import _dist, _envvars, _runinfo
from ._determinism import current_settings
from ._envdiff import diff_fingerprints
from ._errors import CheckpointError, RNGStateError, TorchreproWarning
from ._fingerprint import fingerprint
from ._rng import get_rng_state, rng_state_problems, set_rng_state
from ._seed import seed_from_env, seed_streams
from ._version import __version__

__all__ = ["Checkpointer", "Stateful", "load_checkpoint", "save_checkpoint"]

MAGIC = b"TRCKPT\x00\x01"
FORMAT_VERSION = 1
_HEADER = len(MAGIC) + 32 + 8


@runtime_checkable
class Stateful(Protocol):
    """Anything checkpointable: modules, optimizers, schedulers, loaders, your own classes."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def _check_objects(objects: Mapping[str, object]) -> None:
    for name, obj in objects.items():
        if not isinstance(obj, Stateful):
            raise TypeError(
                f"checkpoint object {name}= must have state_dict() and load_state_dict(), "
                f"got {type(obj).__name__}"
            )


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and fsync each parent of a directory it created."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def _atomic_write(path: Path, payload: bytes | memoryview) -> None:
    _make_dirs(path.parent)
    header = MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(
            fd, 0o666 & ~_umask()
        )  # mkstemp makes 0600; a checkpoint is shared like torch.save's
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint's content and the hex digest of its payload."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {str(path)!r}") from None
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(
            f"{str(path)!r} is not a torchrepro checkpoint (it lacks the torchrepro header)"
        )
    if len(data) < _HEADER:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated: {len(data)} bytes, header incomplete"
        )
    digest = data[len(MAGIC) : len(MAGIC) + 32]
    length = int.from_bytes(data[len(MAGIC) + 32 : _HEADER], "little")
    payload = memoryview(data)[_HEADER:]  # no copy of a possibly huge payload
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or padded: payload has {len(payload)} bytes, "
            f"the header says {length}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its checksum does not match its contents"
        )
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")  # type: ignore[arg-type]
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be unpickled safely: {exc}"
        ) from exc
    if not isinstance(content, dict) or content.get("format") != "torchrepro.checkpoint":
        raise CheckpointError(f"{str(path)!r} is not a torchrepro checkpoint")
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r}; this torchrepro "
            f"{__version__} reads version {FORMAT_VERSION}"
        )
    return content, digest.hex()


def _save(
    path: Path, objects: Mapping[str, Any], extra: dict[str, Any] | None, meta: dict[str, Any]
) -> None:
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    _check_objects(objects)
    # Every rank builds the state dicts (FSDP and ZeRO build them collectively) and takes
    # part in gathering the RNG states; rank 0 alone writes.
    states = {name: obj.state_dict() for name, obj in objects.items()}
    rng_states = _agree(get_rng_state())
    failure: BaseException | None = None
    if _dist.group_rank() == 0:
        try:
            content = {
                "format": "torchrepro.checkpoint",
                "format_version": FORMAT_VERSION,
                "torchrepro_version": __version__,
                "objects": states,
                "extra": dict(extra or {}),
                "rng": rng_states,
                "world_size": _dist.world_size(),
                "determinism": current_settings(),
                "fingerprint": fingerprint(),
                "meta": meta,
            }
            buffer = io.BytesIO()
            torch.save(content, buffer)
            _atomic_write(path, buffer.getbuffer())  # a view: no copy of the payload
        except Exception as exc:
            failure = exc
    # Nobody reads or exits before the file is complete, and a failure on rank 0 reaches
    # every rank instead of leaving them waiting.
    reported = _agree(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if reported[0] is not None:
        raise CheckpointError(f"rank 0 failed to write checkpoint {str(path)!r}: {reported[0]}")


def _agree(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a collective; just ``[value]`` alone)."""
    if not _dist.is_distributed():
        return [value]
    gathered: list[Any] = [None] * _dist.world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def save_checkpoint(
    path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None, **objects: Any
) -> None:
    """Save ``objects`` and every RNG state so that a resumed run is bitwise identical.

    The file holds each object's ``state_dict()``, ``extra``, every rank's RNG state
    (:func:`torchrepro.get_rng_state`), the determinism settings, the environment
    fingerprint, the torchrepro version and a format version. The write is atomic: after a
    crash or ``kill -9`` at any instant, ``path`` holds the previous complete checkpoint or
    the new one. A checksum lets :func:`load_checkpoint` detect a torn or corrupted file.

    Under torch.distributed, call it on every rank with the same path: rank 0 writes the
    objects' state as rank 0 sees it (for sharded FSDP state, pass objects whose
    ``state_dict()`` returns the full state on rank 0), every rank's RNG state is gathered.

    Args:
        path: the file to write (its directory is created).
        extra: a plain dict (ints, floats, strings, lists, tensors) returned by
            :func:`load_checkpoint`, e.g. ``{"step": step}``.
        **objects: named objects with ``state_dict()``/``load_state_dict()``.

    Raises:
        TypeError: an object lacks the protocol, or ``extra`` is not a dict.

    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_checkpoint(f"{d}/ckpt.pt", model=model, extra={"step": 3})
    ...     load_checkpoint(f"{d}/ckpt.pt", model=model)
    {'step': 3}
    """
    _save(Path(path), objects, extra, meta={})


def _warn_environment(path: Path, saved: Any) -> None:
    if not isinstance(saved, dict):
        return
    changed = [d for d in diff_fingerprints(saved, fingerprint()) if d.changes_results]
    if changed:
        lines = "\n".join(f"  {d}" for d in changed)
        warnings.warn(
            f"checkpoint {str(path)!r} was saved in an environment that differs in ways that can "
            f"change results; the resumed run may not be bitwise identical:\n{lines}",
            TorchreproWarning,
            stacklevel=4,
        )


def _check_world_size(path: Path, content: dict[str, Any], strict: bool) -> bool:
    """Whether the world size changed since the save (raises under ``strict``)."""
    saved_world, world = int(content.get("world_size", 1)), _dist.world_size()
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
        stacklevel=4,
    )
    return True


def _check_rng_fits(path: Path, content: dict[str, Any], strict: bool, resized: bool) -> None:
    """Under ``strict``, refuse RNG states made for other devices before anything is loaded."""
    states = content["rng"]
    state = states[0] if resized else states[min(_dist.group_rank(), len(states) - 1)]
    try:
        problems = rng_state_problems(state)
    except (RNGStateError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a malformed RNG state: {exc}"
        ) from exc
    if problems and strict:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was saved on a machine with other devices: {'; '.join(problems)}. "
            "Pass strict=False to restore the RNG states this machine has."
        )


def _restore_rng(path: Path, content: dict[str, Any], strict: bool, resized: bool) -> None:
    states, rank = content["rng"], _dist.group_rank()
    if not resized:
        set_rng_state(states[min(rank, len(states) - 1)], strict=strict)
        return
    seed = seed_from_env()
    if seed is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: re-deriving random streams for the new world size needs "
            f"the run's seed; call torchrepro.seed_everything() first or set {_envvars.SEED}"
        )
    set_rng_state(states[0], strict=False)  # CUDA/MPS layout from rank 0; then reseed per rank
    steps = int(content.get("meta", {}).get("steps", 0))
    seed_streams(seed, "resume", _dist.world_size(), rank, steps)


def _load(
    path: Path, objects: Mapping[str, Any], strict: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    _check_objects(objects)
    content, digest = read_checkpoint(path)
    digests = _agree(digest)
    if len(set(digests)) > 1:
        ranks = [str(r) for r, d in enumerate(digests) if d != digests[0]]
        raise CheckpointError(
            f"ranks read different checkpoints at {str(path)!r} (ranks {', '.join(ranks)} differ from "
            "rank 0): every rank must see the same file, e.g. on a shared filesystem"
        )
    resized = _check_world_size(path, content, strict)  # before anything is loaded
    _check_rng_fits(path, content, strict, resized)
    saved: dict[str, Any] = content["objects"]
    missing = sorted(set(objects) - set(saved))
    unexpected = sorted(set(saved) - set(objects))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"not in the file: {', '.join(missing)}")
        if unexpected:
            parts.append(f"in the file but not passed: {', '.join(unexpected)}")
        message = f"checkpoint {str(path)!r} objects do not match ({'; '.join(parts)})"
        if strict:
            raise CheckpointError(message + "; pass strict=False to load the names both have")
        warnings.warn(message + "; loaded the names both have", TorchreproWarning, stacklevel=4)
    _warn_environment(path, content.get("fingerprint"))
    with _dist.world_size_change_allowed() if resized else contextlib.nullcontext():
        for name, obj in objects.items():
            if name not in saved:
                continue
            try:
                obj.load_state_dict(saved[name])
            except Exception as exc:
                raise CheckpointError(
                    f"loading {name}= from checkpoint {str(path)!r} failed: {exc}"
                ) from exc
    _restore_rng(path, content, strict, resized)  # last: nothing may draw between this and the loop
    return dict(content.get("extra", {})), dict(content.get("meta", {}))


def load_checkpoint(
    path: str | os.PathLike[str], *, strict: bool = True, **objects: Any
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` into ``objects``, then the RNG state.

    Every object is loaded first and the RNG state last, so nothing consumes randomness
    between the restore and the training loop. Reads with ``torch.load(weights_only=True)``.

    Args:
        path: the checkpoint file.
        strict: raise when the names passed and the names saved differ, when the saved RNG
            state does not fit this machine's devices, or when the world size differs. With
            ``strict=False``, load what matches and warn.
        **objects: the same names that were saved.

    Returns:
        The ``extra`` dict saved with the checkpoint (``{}`` if none).

    Raises:
        CheckpointError: the file is missing, not a torchrepro checkpoint, of an unknown
            format version, truncated or corrupted; names do not match (strict); an object's
            ``load_state_dict`` failed (the message names the object).

    Warns:
        TorchreproWarning: the saving machine's fingerprint differs in ways that change
            numerics (the reasons ``torchrepro env --diff`` gives).
    """
    extra, meta = _load(Path(path), objects, strict)
    _runinfo.note("resumed_from", meta.get("steps"))  # for the trace header (None: unknown)
    return extra


class Checkpointer:
    """Few-lines checkpointing for a plain training loop.

    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     ckpt = Checkpointer(f"{d}/ckpt.pt", every=2, model=model)
    ...     ckpt.resume() is None
    ...     for _ in range(3):
    ...         ckpt.step()
    ...     again = Checkpointer(f"{d}/ckpt.pt", every=2, model=model)
    ...     _ = again.resume()
    ...     again.steps
    True
    2

    Args:
        path: the checkpoint file. ``TORCHREPRO_CHECKPOINT``, when set, replaces it; with
            ``None`` and no such variable, checkpointing is off (``.step()`` only counts).
        every: save after every ``every`` steps (an int >= 1).
        **objects: named objects with ``state_dict()``/``load_state_dict()``.

    Environment:
        ``TORCHREPRO_CHECKPOINT``: replaces ``path`` (a checker gives each run its own).
        ``TORCHREPRO_STOP_AT=K``: when ``.steps`` reaches K, save and end the process with
        status 0 (a clean stand-in for a crash right after a save).

    Under torch.distributed, create it on every rank with the same path; rank 0 decides
    whether a checkpoint exists, so all ranks resume or none does.

    Raises:
        TypeError, ValueError: bad ``every``, objects or environment variables.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, every: int, **objects: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(
                f"every must be an int >= 1 (save every N steps), got {type(every).__name__} {every!r}"
            )
        if every < 1:
            raise ValueError(f"every must be an int >= 1 (save every N steps), got {every}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"path must be a str, os.PathLike or None, got {type(path).__name__} {path!r}"
            )
        _check_objects(objects)
        override = _envvars.env_path(_envvars.CHECKPOINT)
        chosen = override if override is not None else path
        self.path: Path | None = None if chosen is None else Path(chosen)
        self.every = every
        self.objects = dict(objects)
        self.steps = 0
        self.stop_at = _envvars.env_int(_envvars.STOP_AT, low=1)
        if self.stop_at is not None and self.path is None:
            raise ValueError(
                f"{_envvars.STOP_AT} is set but the Checkpointer has no path: pass a path or set "
                f"{_envvars.CHECKPOINT}, so the run can save before it stops"
            )

    def resume(self, *, strict: bool = True) -> dict[str, Any] | None:
        """Load ``path`` if it exists and return its ``extra``; None when there is none.

        Args:
            strict: as for :func:`load_checkpoint` (``False`` also accepts another world size).
        """
        if self.path is None:
            return None
        exists = _agree(self.path.exists())[0]  # rank 0 decides for every rank
        if not exists:
            return None
        extra, meta = _load(self.path, self.objects, strict=strict)
        self.steps = int(meta.get("steps", 0))
        _runinfo.note("resumed_from", self.steps)  # for the trace header
        return extra

    def save(self, extra: dict[str, Any] | None = None) -> None:
        """Save now, recording ``.steps``.

        Raises:
            CheckpointError: checkpointing is off (no path).
        """
        if self.path is None:
            raise CheckpointError(
                f"this Checkpointer has no path (pass one, or set {_envvars.CHECKPOINT})"
            )
        _save(self.path, self.objects, extra, meta={"steps": self.steps})

    def step(self, extra: dict[str, Any] | None = None) -> None:
        """Count one completed training step; save every ``every`` steps.

        With ``TORCHREPRO_STOP_AT=K``, the K-th step saves and raises ``SystemExit(0)``.
        """
        self.steps += 1
        stopping = self.stop_at is not None and self.steps == self.stop_at
        if self.path is not None and (self.steps % self.every == 0 or stopping):
            self.save(extra)
        if stopping:
            raise SystemExit(0)
