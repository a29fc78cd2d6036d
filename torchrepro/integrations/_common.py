"""What the framework integrations share: the seed, the stop step and the resume pointer.

A framework keeps its own checkpoint (a Lightning ``.ckpt`` file, a Trainer ``checkpoint-N/``
folder). When ``TORCHREPRO_CHECKPOINT`` is set, the integration also writes a small torchrepro
checkpoint there, *after* the framework's checkpoint is complete: its ``extra`` names the
framework and the checkpoint to resume from, its step count is the optimizer step. It is the
commit record of a stop (``TORCHREPRO_STOP_AT``): ``torchrepro check`` reads its step count,
and the next process resumes from the checkpoint it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from ..checkpoint._checkpointer import Checkpointer
from ..checkpoint._io import read_checkpoint
from ..core import _dist, _envvars, _runinfo
from ..core._seed import SEED_MAX, seed_from_env, validate_seed
from ..trace._trace import Trace

POINTER_VERSION = 1


def check_options(trace: object, deterministic: object) -> None:
    """Validate the ``trace=`` and ``deterministic=`` arguments both integrations take."""
    if not isinstance(trace, (bool, Trace)):
        raise TypeError(
            f"trace must be a bool or a torchrepro.Trace, got {type(trace).__name__} {trace!r}"
        )
    if deterministic not in ("strict", "warn", "off"):
        raise ValueError(f"deterministic must be 'strict', 'warn' or 'off', got {deterministic!r}")


def leave_process_group() -> None:
    """Before a process ends itself (a recorded stop): wait for every rank, then tear down.

    A rank that exits while a peer still uses its gloo connections can make the peer
    abort (SIGABRT) instead of finishing its own save.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stop_step() -> int | None:
    """``TORCHREPRO_STOP_AT`` as an optimizer step >= 1, or None when unset."""
    return _envvars.env_int(_envvars.STOP_AT, low=1)


def pointer_path() -> Path | None:
    """``TORCHREPRO_CHECKPOINT`` as a path, or None when unset."""
    raw = _envvars.env_path(_envvars.CHECKPOINT)
    return None if raw is None else Path(raw)


def resolve_seed(seed: int | None, *, fallback_var: str | None = None) -> int | None:
    """``seed``, else ``TORCHREPRO_SEED``, else the framework's variable; None when none is set.

    Raises:
        TypeError, ValueError: a seed or variable that is not an int in ``[0, 2**64 - 1]``.
    """
    if seed is not None:
        return validate_seed(seed)
    from_env = seed_from_env()
    if from_env is not None or fallback_var is None:
        return from_env
    return _envvars.env_int(fallback_var, low=0, high=SEED_MAX)


def write_pointer(framework: str, step: int, target: str | os.PathLike[str]) -> None:
    """Record at ``TORCHREPRO_CHECKPOINT`` that ``target`` holds step ``step`` (every rank calls it)."""
    path = pointer_path()
    if path is None:
        raise CheckpointError(
            f"{_envvars.CHECKPOINT} is not set: there is nowhere to record the stop"
        )
    pointer = Checkpointer(path, every=1)
    pointer.steps = step
    pointer.save(
        extra={
            "version": POINTER_VERSION,
            "framework": framework,
            "checkpoint": os.path.abspath(os.fspath(target)),
        }
    )


def read_pointer(framework: str) -> tuple[str, int] | None:
    """The framework checkpoint ``TORCHREPRO_CHECKPOINT`` names and its step; None when there is none.

    Reads the file without loading anything into this process.

    Raises:
        CheckpointError: the file is not such a record, is another framework's, or names a
            checkpoint that no longer exists.
    """
    path = pointer_path()
    if path is None or not path.exists():
        return None
    content, _digest = read_checkpoint(path)
    extra: dict[str, Any] = content.get("extra", {})
    steps = content.get("meta", {}).get("steps")
    if extra.get("version") != POINTER_VERSION or not isinstance(steps, int):
        raise CheckpointError(
            f"{_envvars.CHECKPOINT}={str(path)!r} is a torchrepro checkpoint, not a {framework} resume "
            f"record; point {_envvars.CHECKPOINT} at a fresh path for a {framework} run"
        )
    if extra.get("framework") != framework:
        raise CheckpointError(
            f"{_envvars.CHECKPOINT}={str(path)!r} records a {extra.get('framework')} checkpoint, "
            f"but this is a {framework} run; use another path"
        )
    target = str(extra.get("checkpoint"))
    if not os.path.exists(target):
        raise CheckpointError(
            f"{_envvars.CHECKPOINT}={str(path)!r} names the {framework} checkpoint {target!r}, "
            "which no longer exists; delete the record to start afresh"
        )
    return target, steps


def run_output_dir(framework: str) -> Path | None:
    """A folder of this run's own for a framework's outputs, when torchrepro runs the script.

    Under ``torchrepro check`` every run has its own ``TORCHREPRO_CHECKPOINT`` (else its own
    ``TORCHREPRO_TRACE``); the folder sits beside it, so runs never read each other's
    checkpoints. None when neither variable is set (the script's own folder stays in use).
    """
    anchor = pointer_path()
    if anchor is None:
        trace = _envvars.env_path(_envvars.TRACE)
        anchor = None if trace is None else Path(trace)
    return None if anchor is None else anchor.with_name(f"{anchor.name}.{framework}-output")


def note_resumed(step: int) -> None:
    """Tell the trace header which optimizer step this process resumed from."""
    _runinfo.note("resumed_from", step)


def world() -> tuple[int, int]:
    """This process's rank in the default process group, and the world size."""
    return _dist.group_rank(), _dist.world_size()
