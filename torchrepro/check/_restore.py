"""What a resume did not restore: the saved objects' state after a resume, set beside the
uninterrupted run's at the same step.

Both runs keep every checkpoint they save (``TORCHREPRO_KEEP_CHECKPOINTS``). The first
step after the stop that both saved holds the evidence: a hyperparameter that differs
there (a learning rate the restarted scheduler set, a momentum) is the cause, named first;
differing tensors (weights, moments) follow from it and are counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._errors import CheckpointError
from ..checkpoint._io import read_checkpoint

__all__ = ["kept_checkpoints", "restore_differences"]

# How many differing hyperparameters to name (the first is usually the cause).
SHOWN = 4


def kept_checkpoints(directory: Path) -> dict[int, Path]:
    """The checkpoints a run kept with ``TORCHREPRO_KEEP_CHECKPOINTS``, by step."""
    kept = {}
    for path in directory.glob("checkpoint.pt.step*"):
        suffix = path.name.rsplit(".step", 1)[1]
        if suffix.isdigit():
            kept[int(suffix)] = path
    return kept


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{path}[{key!r}]" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return bool(a == b) and type(a) is type(b)


def restore_differences(reference: Path, resumed: Path, resume_at: int) -> str | None:
    """What the resumed run's first checkpoint after ``resume_at`` holds otherwise than the
    uninterrupted run's at the same step, as a sentence; None when nothing can be said
    (no common save after the stop, an unreadable checkpoint, or no difference).
    """
    ours, theirs = kept_checkpoints(reference), kept_checkpoints(resumed)
    common = sorted(s for s in ours if s > resume_at and s in theirs)
    if not common:
        return None
    step = common[0]
    try:
        a, _ = read_checkpoint(ours[step])
        b, _ = read_checkpoint(theirs[step])
    except CheckpointError:
        return None
    left = dict(_leaves(a.get("objects", {}), ""))
    right = dict(_leaves(b.get("objects", {}), ""))
    values, tensors = [], []
    for key in sorted(left.keys() | right.keys()):
        x, y = left.get(key), right.get(key)
        if isinstance(x, str) and isinstance(y, str):  # each run's own paths (the trace's)
            x, y = x.replace(str(reference), "<run>"), y.replace(str(resumed), "<run>")
        if _same(x, y):
            continue
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            tensors.append(key)
        else:
            values.append(f"{key}: {x!r} vs {y!r}")
    if not values and not tensors:
        return None
    parts = values[:SHOWN] + ([f"{len(values) - SHOWN} more values"] if len(values) > SHOWN else [])
    if tensors:
        parts.append(f"{len(tensors)} tensor{'s' if len(tensors) != 1 else ''} ({tensors[0]}, ...)")
    return (
        f"the first save after the resume (step {step}) differs from the uninterrupted run's "
        f"(uninterrupted vs resumed) in: {'; '.join(parts)}"
    )
