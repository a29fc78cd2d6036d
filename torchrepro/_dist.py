"""What torchrepro needs to know about torch.distributed: rank and world size."""

from __future__ import annotations

import os

import torch


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


def rank() -> int:
    """Global rank: from the process group when initialised, else ``RANK`` (torchrun), else 0."""
    if is_distributed():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """World size of the default process group, or 1 outside torch.distributed."""
    if is_distributed():
        return int(torch.distributed.get_world_size())
    return 1
