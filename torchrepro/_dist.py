"""What torchrepro needs to know about torch.distributed: rank and world size."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch


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
