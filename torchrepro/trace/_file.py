"""The trace file format: the one module that writes, reads and versions it.

A trace is a JSON-lines file. Each process that writes to it starts its own *segment*
with a header line, then appends one record line per traced step:

    {"format": "torchrepro-trace", "version": 3, ..., "facts": {...}, "fingerprint": {...}}
    {"step": 1, "state": false, "entries": [{"name": "loss", "kind": "loss", ...}, ...]}
    ...
    {"step": 10, "state": true, "entries": [loss, params, buffers, ..., batch]}
    ...
    {"format": "torchrepro-trace", "version": 3, ..., "facts": {"resumed_from": 37, ...}}
    {"step": 38, "state": false, "entries": [...]}
    ...
    {"end": 56, "entries": [params, buffers, ...]}

A header holds what the writing process observed about itself (``facts``: the seed it
was seeded with, the effective ``num_workers`` of each torchrepro loader, the world
size, torch's thread count, the step it resumed from) and its full environment
fingerprint with a digest, so ``torchrepro check`` verifies what each run really did,
and two machines' traces can be compared with the environment differences that explain
them. Record entries are described in :class:`TraceData`.

Every record holds the loss, the named tensors and the batch; a *state* record
(``"state": true``, every ``state_every`` steps) also holds the model's parameters,
buffers and gradients. A process that ends after a step whose record held no state
appends an *end* line with the state it ended with (``"end"``: that step).

Version 3 (this one) added state and end lines (a version 2 record always held the
state, and is read as a state record). Version 2 changed the checksum (non-linear; see
:mod:`torchrepro.trace._checksum`), added the facts, the fingerprint, the segments, batch
entries, and exact integer loss values. Version 1 traces are refused with a clear error:
their checksums cannot be compared with later versions'.

Reading is bounded: only regular files, at most ``max_bytes`` in all, at most
:data:`MAX_LINE_BYTES` per line, UTF-8 only; JSON too deeply nested or with huge
integers is refused as corruption, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from .._errors import TraceError

__all__ = [
    "MAX_LINE_BYTES",
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "STATE_KINDS",
    "TraceData",
    "TraceError",
    "encode",
    "fingerprint_digest",
    "json_float",
    "parse",
    "read_trace",
]

TRACE_FORMAT = "torchrepro-trace"
TRACE_VERSION = 3
READABLE_VERSIONS = (2, 3)
STATE_KINDS = frozenset({"param", "buffer", "grad"})
MAX_BYTES = 1 << 32  # default bound on a whole trace (4 GiB)
MAX_LINE_BYTES = 1 << 26  # 64 MiB: a record of a model with a million tensors


def json_float(value: float | None) -> float | str | None:
    """``value`` as strict JSON allows: non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def encode(line: dict[str, Any]) -> bytes:
    """One line of the file (a header or a record), newline included."""
    return (json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n").encode()


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """A short, stable digest of an environment fingerprint (sha256 of its sorted JSON)."""
    text = json.dumps(fp, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TraceData:
    """A parsed trace: its headers and its step records, in file order.

    Attributes:
        path: the file read.
        header: the first segment's header: ``format``, ``version``, ``torchrepro`` and
            ``torch`` versions, ``rank``, ``world_size``, ``every``, ``grads``,
            ``norm_every``, ``facts`` (``seed``, ``loaders`` as ``[{"num_workers": n}]``,
            ``world_size``, ``torch_threads``, ``resumed_from``), ``fingerprint`` (the full
            environment fingerprint) and ``fingerprint_digest``.
        records: ``{"step": int, "state": bool, "entries": [dict, ...]}`` per traced step,
            steps strictly increasing (``state`` is added as True for version 2 records:
            whether the record holds the model's state, the entries of :data:`STATE_KINDS`). An entry has ``name``, ``kind`` (``loss``, ``param``, ``buffer``,
            ``grad``, ``tensor``, ``batch``) and ``checksum`` (16 hex digits; ``None`` for
            a missing gradient); tensors also ``dtype``, ``shape`` and, on steps that
            record norms, ``norm``; the loss ``value`` (an exact int for integer losses)
            and ``bits``; the batch ``tensors`` (how many it held).
        torn: whether a torn last line (a crash mid-write) was ignored.
        headers: every segment's header, in file order (one per writing process).
        segment_starts: for each header, the index in ``records`` of its first record.
        end: ``{"step": int, "entries": [...]}``: the state the last process ended with,
            after the last record's step (whose record held no state); None when the
            trace has no such end line (the process did not exit normally, or the last
            record held the state).
    """

    path: str
    header: dict[str, Any]
    records: list[dict[str, Any]]
    torn: bool = False
    headers: list[dict[str, Any]] = field(default_factory=list)
    segment_starts: list[int] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @property
    def steps(self) -> list[int]:
        """The traced step numbers, in file order."""
        return [r["step"] for r in self.records]

    def segments(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """``(header, records)`` of each writing process, in file order."""
        headers = self.headers or [self.header]
        starts = self.segment_starts or [0]
        ends = [*starts[1:], len(self.records)]
        return [(h, self.records[s:e]) for h, s, e in zip(headers, starts, ends, strict=True)]


def _check_header(header: dict[str, Any], path: str, line: int) -> dict[str, Any]:
    version = header.get("version")
    if version not in READABLE_VERSIONS:
        hint = (
            " (written by torchrepro before the checksum became non-linear); its checksums "
            "cannot be compared with this version's: re-run the command to record a new trace"
            if version == 1
            else ""
        )
        raise TraceError(
            f"{path}, line {line}: a torchrepro trace of format version {version!r}; this "
            f"torchrepro reads versions {', '.join(map(str, READABLE_VERSIONS))}{hint}"
        )
    if not isinstance(header.get("facts", {}), dict):
        raise TraceError(f"{path}, line {line}: header 'facts' must be a JSON object")
    return header


def _valid_entries(entries: object) -> bool:
    return isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("kind"), str)
        for e in entries
    )


def _is_step(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(record: dict[str, Any], path: str, line: int) -> dict[str, Any]:
    key = "end" if "end" in record else "step"
    ok = (
        _is_step(record.get(key))
        and _valid_entries(record.get("entries"))
        and isinstance(record.get("state", True), bool)
    )
    if not ok:
        shape = (
            "{'end': int, 'entries': [...]}" if key == "end" else "{'step': int, 'entries': [...]}"
        )
        raise TraceError(f"{path}, line {line}: not a trace record ({shape})")
    if key == "step":
        record.setdefault("state", True)  # version 2: every record held the state
    return record


def _loads(raw: bytes) -> Any:
    """JSON of one line; ValueError (not a crash) for any malformed or hostile content."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    # UnicodeDecodeError and JSONDecodeError are ValueErrors, and so is an integer of
    # more digits than Python converts (sys.get_int_max_str_digits)


def _lines(path: str, max_bytes: int) -> tuple[list[bytes], bytes]:
    """The complete lines of ``path`` (without newlines) and its torn last piece."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise TraceError(
            f"trace file {path} does not exist; did the run create a torchrepro.Trace?"
        ) from exc
    except OSError as exc:
        raise TraceError(f"cannot open trace file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TraceError(
                f"{path} is not a regular file (a device, FIFO or directory); a trace is a "
                "file written by torchrepro.Trace"
            )
        if info.st_size > max_bytes:
            raise TraceError(
                f"{path} holds {info.st_size} bytes, more than max_bytes={max_bytes}; pass a "
                "larger max_bytes to read_trace if this trace is genuine"
            )
        lines: list[bytes] = []
        total = 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return lines, b""
            total += len(line)
            if total > max_bytes:
                raise TraceError(f"{path} grew past max_bytes={max_bytes} while being read")
            if not line.endswith(b"\n"):
                if len(line) > MAX_LINE_BYTES:
                    raise TraceError(
                        f"{path}, line {len(lines) + 1}: longer than {MAX_LINE_BYTES} bytes; "
                        "not a torchrepro trace"
                    )
                return lines, line
            lines.append(line[:-1])


@dataclass
class Parsed:
    """What :func:`parse` read: the lines of a trace file, by kind."""

    headers: list[tuple[int, dict[str, Any]]]  # (index of its first record, header)
    records: list[tuple[int, dict[str, Any], bytes]]  # (line number, record, raw line)
    torn: bool
    end: dict[str, Any] | None  # the end line right after the last record, if any


def parse(path: str, max_bytes: int = MAX_BYTES) -> Parsed:
    """Parse a trace file's headers, records and final end line.

    A last line that does not parse (or lacks its newline) is a torn write and is
    dropped; a bad line elsewhere is corruption. An end line counts only if it follows
    the last record and names its step (an earlier one belongs to a process that was
    resumed, or to a :meth:`Trace.close` the run continued after).

    Raises:
        TraceError: the file is missing, not a regular file, too large, empty, not a
            trace, of another format version, corrupted, or its steps repeat or go back.
    """
    complete, last = _lines(path, max_bytes)
    torn = last != b""
    if not complete:
        if torn:
            raise TraceError(
                f"{path} holds only a torn header line; the run stopped before its first traced step"
            )
        raise TraceError(f"{path} is empty; the run recorded no traced step")
    headers: list[tuple[int, dict[str, Any]]] = []
    records: list[tuple[int, dict[str, Any], bytes]] = []
    end: dict[str, Any] | None = None
    for number, raw in enumerate(complete, start=1):
        try:
            value = _loads(raw)
        except ValueError as exc:
            if number == len(complete) and not torn and number > 1:
                torn = True  # a torn line whose newline made it to disk
                break
            if number == 1:
                value = None
            else:
                raise TraceError(f"{path}, line {number}: corrupted trace line ({exc})") from exc
        if number == 1 and not (isinstance(value, dict) and value.get("format") == TRACE_FORMAT):
            raise TraceError(
                f"{path} is not a torchrepro trace (its first line is not a torchrepro-trace "
                "header); traces are written by torchrepro.Trace"
            )
        if not isinstance(value, dict):
            raise TraceError(f"{path}, line {number}: not a trace line (a JSON object)")
        if value.get("format") == TRACE_FORMAT:
            headers.append((len(records), _check_header(value, path, number)))
            end = None
            continue
        record = _check_record(value, path, number)
        if "end" in record:
            after = records[-1][1]["step"] if records else None
            named = record["end"] == after  # else it is not the state after the last record
            end = {"step": record["end"], "entries": record["entries"]} if named else None
            continue
        end = None
        if records and record["step"] <= records[-1][1]["step"]:
            previous_line, previous, _ = records[-1]
            what = "repeats" if record["step"] == previous["step"] else "goes back from"
            raise TraceError(
                f"{path}, line {number}: step {record['step']} {what} step "
                f"{previous['step']} (line {previous_line}); two writers shared this file, or "
                "it was edited. Give each run its own trace path (TORCHREPRO_TRACE)"
            )
        records.append((number, record, raw))
    return Parsed(headers, records, torn, end)


def read_trace(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> TraceData:
    """Read a trace written by :class:`torchrepro.Trace`, ignoring a torn last line.

    Args:
        path: the trace file.
        max_bytes: refuse a larger file (a bound against reading the wrong file).

    Returns:
        The :class:`TraceData`.

    Raises:
        TraceError: the file is missing, not a regular file, larger than ``max_bytes``,
            empty, not a torchrepro trace, of another format version, corrupted other
            than in its last line, or its step numbers repeat or go back.
        TypeError: ``path`` is not a str or path, or ``max_bytes`` not an int.

    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "t.jsonl")
    >>> with open(p, "w") as f:
    ...     _ = f.write(json.dumps({"format": "torchrepro-trace", "version": 2}) + "\\n")
    ...     _ = f.write(json.dumps({"step": 1, "entries": []}) + "\\n")
    ...     _ = f.write('{"step": 2, "entr')  # torn by a crash
    >>> read_trace(p).steps
    [1]
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise TypeError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
    name = os.fspath(path)
    parsed = parse(name, max_bytes)
    return TraceData(
        name,
        parsed.headers[0][1],
        [r for _, r, _ in parsed.records],
        parsed.torn,
        [h for _, h in parsed.headers],
        [start for start, _ in parsed.headers],
        parsed.end,
    )
