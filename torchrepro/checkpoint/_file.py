"""The checkpoint file format: one module writes, reads, verifies and versions it.

A file is ``MAGIC | sha256(payload) | len(payload) | payload``; the payload is ``torch.save``
of a plain dict. Writing streams ``torch.save`` straight into a temporary file in the target's
directory while hashing it (no in-memory copy of the payload), checks that the temporary file
unpickles under ``torch.load(weights_only=True)`` (tensors mapped to ``meta``, so no data is
read), fsyncs it and ``os.replace``-s it over the target. Reading hashes the payload from the
open file in fixed-size chunks, then unpickles from the same open file, so the peak memory is
the loaded tensors themselves, as for ``torch.load``.

What goes into the payload is checked at save time (:func:`unloadable`): anything
``weights_only`` unpickling refuses (NumPy values, datetimes, dataclasses, enums, paths,
``torch.Generator``...) is refused by name and type before a byte is written.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import os
import re
import secrets
import socket
import stat
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import IO, Any

import torch

from .._errors import CheckpointError
from .._version import __version__

MAGIC = b"TRCKPT\x00\x01"
FORMAT = "torchrepro.checkpoint"
FORMAT_VERSION = 1
HEADER = len(MAGIC) + 32 + 8
_CHUNK = 1 << 22  # 4 MiB: hashing reads the file in pieces of this size


# ----------------------------------------------------------------------------- payload check

_PLAIN = (str, int, float, bool, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)
_probed: dict[type, bool] = {}


def _round_trips(value: object) -> bool:
    """Whether ``value`` alone survives ``torch.save`` + ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True, map_location="meta")
    except Exception:
        return False
    return True


def _hint(value: object) -> str:
    kind = type(value)
    module = kind.__module__.split(".")[0]
    if module == "numpy":
        if kind.__name__ == "ndarray":
            return "store torch.from_numpy(x) or x.tolist() instead"
        return "store x.item() (a Python number) instead"
    if isinstance(value, enum.Enum):
        return "store x.value (or x.name) instead"
    if dataclasses.is_dataclass(value):
        return "store dataclasses.asdict(x) instead"
    if isinstance(value, PurePath):
        return "store str(x) instead"
    if module == "datetime":
        return "store x.isoformat() (or a timestamp) instead"
    if isinstance(value, range):
        return "store list(x) or (start, stop, step) instead"
    if isinstance(value, torch.Generator):
        return "store x.get_state() (a uint8 tensor) and restore it with set_state() instead"
    if isinstance(value, Mapping):
        return "store dict(x) instead"
    if isinstance(value, (set, frozenset)):
        return "store sorted(x) or list(x) instead"
    return "convert it to dicts, lists, tuples, numbers, strings and tensors"


def _type_name(value: object) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def unloadable(value: object, where: str) -> str | None:
    """Why ``value`` could not be loaded back by ``torch.load(weights_only=True)``; None if it can.

    The message names the first offending entry by its key path (``where`` is the root's
    name, e.g. ``extra``) and its type, and says what to store instead. Containers are
    walked; leaves of an unfamiliar type are tried on their own (cached per type).
    """
    stack: list[tuple[object, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        kind = type(item)
        if kind in (dict, list, tuple, OrderedDict):
            if isinstance(item, dict):
                for key, sub in reversed(list(item.items())):
                    if type(key) not in _PLAIN:
                        return _refusal(key, f"{path} key {key!r}")
                    stack.append((sub, f"{path}[{key!r}]"))
            else:
                assert isinstance(item, (list, tuple))
                stack.extend((sub, f"{path}[{i}]") for i, sub in reversed(list(enumerate(item))))
            continue
        if kind in (set, frozenset):
            assert isinstance(item, (set, frozenset))
            stack.extend((sub, f"{path} item {sub!r}") for sub in item)
            if not _probed.setdefault(kind, _round_trips(kind())):
                return _refusal(item, path)
            continue
        if kind in _PLAIN or kind in (torch.Tensor, torch.nn.Parameter):
            continue
        if isinstance(item, (dict, list, tuple)) or dataclasses.is_dataclass(item):
            ok = _round_trips(item)  # a subclass or a record: its class must be allowed itself
        else:
            known = _probed.get(kind)
            ok = _probed.setdefault(kind, _round_trips(item)) if known is None else known
        if not ok:
            return _refusal(item, path)
    return None


def _refusal(value: object, path: str) -> str:
    return (
        f"{path}: {_type_name(value)} is refused by torch.load(weights_only=True), so the "
        f"checkpoint could never be loaded; {_hint(value)}"
    )


# ----------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and fsync each parent of a directory it created."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def target(path: Path) -> Path:
    """The file a write to ``path`` must replace: a symlink's final target, not the link."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.torchrepro\.([0-9a-f]{{8}})\.(\d+)\.[0-9a-f]+\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove temporary files a killed save of ``path`` left behind; return what was removed.

    Only names this module's own pattern owns (``.NAME.torchrepro.HOST.PID.RANDOM.tmp``),
    made on this host by a process that no longer exists. Temp files of live saves, of
    other hosts (a shared filesystem) and of older torchrepro versions are left alone.
    """
    path = target(path)
    pattern = _temp_pattern(path.name)
    removed: list[Path] = []
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there, not probe it
        return removed
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or match.group(1) != _HOST:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        stale = path.parent / name
        try:
            stale.unlink()
        except OSError:
            continue
        removed.append(stale)
    return removed


class _HashingWriter:
    """A write-only file object that hashes and counts what ``torch.save`` streams into it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.length += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


class _Window(io.RawIOBase):
    """A read-only view of ``f`` from byte ``start`` on (the payload after the header)."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length = f, start, length
        self._f.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell() - self._start

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self.tell() + offset
        else:
            position = self._length + offset
        self._f.seek(self._start + max(position, 0))
        return self.tell()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        left = max(self._length - self.tell(), 0)
        if len(view) > left:
            view = view[:left]
        return self._f.readinto(view)  # type: ignore[attr-defined, no-any-return]


def _unpickle(f: IO[bytes], length: int, map_location: str, failure: str) -> Any:
    try:
        return torch.load(
            io.BufferedReader(_Window(f, HEADER, length), _CHUNK),
            weights_only=True,
            map_location=map_location,
        )
    except Exception as exc:
        raise CheckpointError(f"{failure}: {exc}") from exc


def write(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` to ``path`` atomically (temp file, fsync, replace, directory fsync).

    ``path`` may be a symlink: its target is replaced and the link kept. Stale temporary
    files of earlier, killed saves of the same file are removed first.

    Raises:
        CheckpointError: ``content`` would not load back under ``weights_only=True``.
        OSError: the file cannot be written; the previous file is intact.
    """
    path = target(path)
    _make_dirs(path.parent)
    remove_stale_temps(path)
    tmp = path.parent / f".{path.name}.torchrepro.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(bytes(HEADER))  # placeholder: the digest is known once the payload is out
            writer = _HashingWriter(f)
            torch.save(content, writer)  # type: ignore[arg-type]
            f.seek(0)
            f.write(MAGIC + writer.sha.digest() + writer.length.to_bytes(8, "little"))
            f.flush()
            # Never leave a file nobody can read back: unpickle it as load will (no data read).
            failure = f"checkpoint {str(path)!r} not written: it would not load back"
            _unpickle(f, writer.length, "meta", failure)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- reading


def read(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint's content and the hex digest of its payload.

    The payload is verified against its checksum before anything is unpickled.

    Raises:
        CheckpointError: missing, unreadable, not a torchrepro checkpoint, truncated,
            corrupted, unsafe to unpickle, or of another format version.
    """
    where = repr(str(path))
    try:
        # Non-blocking open: a FIFO at the path must not hang the load.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {where}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {where}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"checkpoint path {where} is not a regular file")
    os.set_blocking(fd, True)
    f = os.fdopen(fd, "rb")
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {where}: {exc.strerror or exc}") from exc
        if head[: len(MAGIC)] != MAGIC:
            raise CheckpointError(
                f"{where} is not a torchrepro checkpoint (it lacks the torchrepro header)"
            )
        if len(head) < HEADER:
            raise CheckpointError(
                f"checkpoint {where} is truncated: {size} bytes, header incomplete"
            )
        digest = head[len(MAGIC) : len(MAGIC) + 32]
        length = int.from_bytes(head[len(MAGIC) + 32 :], "little")
        if size - HEADER != length:
            raise CheckpointError(
                f"checkpoint {where} is truncated or padded: payload has {size - HEADER} bytes, "
                f"the header says {length}"
            )
        sha = hashlib.sha256()
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        try:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                sha.update(view[:n])
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {where}: {exc.strerror or exc}") from exc
        del view, buffer
        if sha.digest() != digest:
            raise CheckpointError(
                f"checkpoint {where} is corrupted: its checksum does not match its contents"
            )
        content = _unpickle(f, length, "cpu", f"checkpoint {where} cannot be unpickled safely")
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a torchrepro checkpoint")
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {where} has format version {version!r}; this torchrepro "
            f"{__version__} reads version {FORMAT_VERSION}"
        )
    return content, digest.hex()
