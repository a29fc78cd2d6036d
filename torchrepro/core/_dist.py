"""What torchrepro needs to know about torch.distributed: rank, world size, and a bounded exchange."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import itertools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import _envvars, _teardown  # noqa: F401  (_teardown registers its atexit handler)

DEFAULT_TIMEOUT = 300.0  # seconds; TORCHREPRO_DIST_TIMEOUT replaces it


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


def rank() -> int:
    """Launcher rank: from the process group when initialised, else ``RANK`` (torchrun), else 0.

    For choosing per-rank random streams and trace files, which must differ between the
    processes a launcher started even before they join a process group.
    """
    if is_distributed():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def group_rank() -> int:
    """Rank in the default process group, or 0 without one.

    For who writes shared files and which saved per-rank state is this process's: without
    a process group every process is on its own, whatever ``RANK`` says.
    """
    return int(torch.distributed.get_rank()) if is_distributed() else 0


def world_size() -> int:
    """World size of the default process group, or 1 outside torch.distributed."""
    if is_distributed():
        return int(torch.distributed.get_world_size())
    return 1


_WORLD_SIZE_CHANGE = contextvars.ContextVar("torchrepro_world_size_change", default=False)


@contextlib.contextmanager
def world_size_change_allowed() -> Iterator[None]:
    """Within this block, state dicts saved under another world size may be loaded.

    ``load_checkpoint(strict=False)`` opens it; stateful objects that know a world size
    (``torchrepro.DataLoader``) consult :func:`world_size_change_is_allowed`.
    """
    token = _WORLD_SIZE_CHANGE.set(True)
    try:
        yield
    finally:
        _WORLD_SIZE_CHANGE.reset(token)


def world_size_change_is_allowed() -> bool:
    """Whether the caller is inside :func:`world_size_change_allowed`."""
    return _WORLD_SIZE_CHANGE.get()


def timeout() -> float:
    """How long :func:`agree` waits for the other ranks, in seconds.

    ``TORCHREPRO_DIST_TIMEOUT`` (a number of seconds > 0), else 300.

    Raises:
        ValueError: naming the variable, when it is not a positive number.
    """
    raw = os.environ.get(_envvars.DIST_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"environment variable {_envvars.DIST_TIMEOUT} must be a number of seconds > 0, "
            f"got {raw!r}"
        )
    return value


class ExchangeTimeoutError(TimeoutError):
    """Some ranks did not reach the same :func:`agree` in time.

    Attributes:
        missing: the ranks that did not arrive.
    """

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


_sequence = itertools.count(1)


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def agree(value: bytes, decide: Callable[[list[bytes]], bytes]) -> tuple[bytes, list[bytes] | None]:
    """Rank 0 gathers every rank's ``value`` and decides; every rank gets the decision.

    Returns ``(decision, values)``: ``values`` is every rank's value in rank order on rank
    0, None on the others. Goes through the process group's key-value store, not a
    collective of the backend: it needs no device, cannot be mixed up with the training
    loop's collectives, and costs O(world size) messages. Rank 0 waits at most
    :func:`timeout` seconds for the others and then tells every rank that arrived which
    ranks did not; the others wait at most twice that for rank 0. Outside
    torch.distributed it returns ``(decide([value]), [value])``.

    Raises:
        ExchangeTimeoutError: some ranks did not arrive in time (they are named).
        ValueError: ``TORCHREPRO_DIST_TIMEOUT`` is malformed.
    """
    if not is_distributed():
        return decide([value]), [value]
    seconds = timeout()
    store = _store()
    step, me, world = next(_sequence), group_rank(), world_size()
    base = f"torchrepro/agree/{step}/"
    store.set(base + str(me), value)
    if me == 0:
        keys = [base + str(r) for r in range(world)]
        try:
            store.wait(keys, datetime.timedelta(seconds=seconds))
        except Exception as exc:  # the store's timeout error
            try:
                missing = [r for r, key in enumerate(keys) if not store.check([key])]
            except Exception:
                missing = list(range(1, world))
            message = (
                f"rank{'s' if len(missing) != 1 else ''} {', '.join(map(str, missing))} did not "
                f"arrive within {seconds:g} s ({type(exc).__name__})"
            )
            with contextlib.suppress(Exception):  # release the ranks that did arrive
                store.set(base + "decision", b"\x00" + message.encode())
            raise ExchangeTimeoutError(message, missing) from exc
        values = [bytes(store.get(key)) for key in keys]
        decision = decide(values)
        store.set(base + "decision", b"\x01" + decision)
    else:
        values = None
        try:
            store.wait([base + "decision"], datetime.timedelta(seconds=2 * seconds))
            raw = bytes(store.get(base + "decision"))
        except Exception as exc:  # rank 0 never came, or the store it hosts is gone
            raise ExchangeTimeoutError(
                f"rank 0 did not answer within {2 * seconds:g} s ({type(exc).__name__})", [0]
            ) from exc
        if raw[:1] == b"\x00":
            raise ExchangeTimeoutError(raw[1:].decode(), [])
        decision = raw[1:]
    if step > 1:  # every rank has reached this step, so all are done with the previous one
        with contextlib.suppress(Exception):
            store.delete_key(f"torchrepro/agree/{step - 1}/{me}")
            if me == 0:
                store.delete_key(f"torchrepro/agree/{step - 1}/decision")
    return decision, values
