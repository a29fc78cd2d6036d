"""The :class:`Checkpointer`: save every N steps, resume, and stop where ``check`` asks.

It is the few-lines front of :mod:`._io` (:func:`save_checkpoint`, :func:`load_checkpoint`),
and the place where ``torchrepro check``'s stop (``TORCHREPRO_STOP_AT``) and kept
checkpoints (``TORCHREPRO_KEEP_CHECKPOINTS``) act.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from .._errors import CheckpointError
from ..core import _dist, _envvars, _runinfo
from ..core._rng import get_rng_state
from ._audit import SaveAudit
from ._io import (
    _attempt,
    _check_bool,
    _settle,
    check_objects,
    check_path,
    keep,
    load_with_meta,
    save_with_meta,
)

__all__ = ["Checkpointer"]

log = logging.getLogger("torchrepro")


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
        **objects: named objects with ``state_dict()``/``load_state_dict()``; ``None``
            values are skipped, so ``scheduler=None`` works when a run has none.

    Environment:
        ``TORCHREPRO_CHECKPOINT``: replaces ``path`` (a checker gives each run its own).
        ``TORCHREPRO_STOP_AT=K``: when ``.steps`` reaches K, save and end the process with
        status 0 (a clean stand-in for a crash right after a save).
        ``TORCHREPRO_KEEP_CHECKPOINTS=1``: also keep each save as ``<path>.step<K>``.

    Logging (logger ``"torchrepro"``, WARNING, so visible by default; rank 0 only): ``resume()`` says
    "resumed from PATH at step K"; and when a resumed process ends without a single
    further ``step()``, it says the checkpoint was already at the end of training (running
    a finished script again trains nothing).

    Under torch.distributed, create it on every rank with the same path; rank 0 decides
    whether a checkpoint exists, so all ranks resume or none does.

    Raises:
        TypeError, ValueError: bad ``path``, ``every``, objects or environment variables.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, every: int, **objects: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int):
            raise TypeError(
                f"every must be an int >= 1 (save every N steps), got {type(every).__name__} {every!r}"
            )
        if every < 1:
            raise ValueError(f"every must be an int >= 1 (save every N steps), got {every}")
        if path is not None:
            check_path(path, none=" (or None: no checkpointing)")
        self.objects = check_objects(objects)
        override = _envvars.env_path(_envvars.CHECKPOINT)
        chosen = override if override is not None else path
        self.path: Path | None = None if chosen is None else Path(chosen)
        self.every = every
        self.steps = 0
        self.stop_at = _envvars.env_int(_envvars.STOP_AT, low=1)
        if self.stop_at is not None and self.path is None:
            raise ValueError(
                f"{_envvars.STOP_AT} is set but the Checkpointer has no path: pass a path or set "
                f"{_envvars.CHECKPOINT}, so the run can save before it stops"
            )
        self._resumed_at: int | None = None
        self._audit = SaveAudit(self.objects)
        exit_state = _envvars.env_path(_envvars.EXIT_STATE)
        if exit_state is not None and _dist.world_size() == 1:
            # A strong reference: a script's objects usually die with its main() before
            # exit, and the state they ended with is what is compared (only under check).
            atexit.register(_write_exit_state, self, Path(exit_state))

    def resume(self, *, strict: bool = True) -> dict[str, Any] | None:
        """Load ``path`` if it exists and return its ``extra``; None when there is none.

        Logs "resumed from PATH at step K" at WARNING level.

        Args:
            strict: as for :func:`load_checkpoint` (``False`` also accepts another world size).

        Raises:
            TypeError: ``strict`` is not a bool.
            CheckpointError: as for :func:`load_checkpoint`.
        """
        _check_bool(strict, "strict")
        if self.path is None:
            return None
        path = self.path
        exists, error = _attempt(path.exists)
        rank0, _every = _settle(
            f"Checkpointer.resume() of {str(path)!r}",
            error,
            op="Checkpointer.resume",
            path=str(path),
            exists=exists,
        )
        if not rank0["exists"]:  # rank 0 decides for every rank
            return None
        extra, meta = load_with_meta(path, self.objects, strict)
        self.steps = int(meta.get("steps", 0))
        _runinfo.note("resumed_from", self.steps)  # for the trace header
        notes = meta.get("notes")
        if isinstance(notes, list) and notes:  # what the checkpoint was saved without
            _runinfo.note("checkpoint_notes", [str(n) for n in notes])
        self._resumed_at = self.steps
        if _dist.group_rank() == 0:  # once per run, not once per rank
            log.warning("torchrepro: resumed from %s at step %d", path, self.steps)
            atexit.register(_report_no_progress, weakref.ref(self))
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
        notes = self._audit.findings(self.steps)
        for note in notes:
            key = note.split(" at step ")[0]  # once per kind of finding, not per save
            if key not in self._audit.reported and _dist.group_rank() == 0:
                log.warning("torchrepro: checkpoint %s: %s", self.path, note)
            self._audit.reported.add(key)
        meta: dict[str, Any] = {"steps": self.steps}
        if notes:
            meta["notes"] = notes
        save_with_meta(self.path, self.objects, extra, meta=meta)
        if _envvars.env_int(_envvars.KEEP_CHECKPOINTS, low=0, high=1) and _dist.group_rank() == 0:
            keep(self.path, self.steps)

    def step(self, extra: dict[str, Any] | None = None) -> None:
        """Count one completed training step; save every ``every`` steps.

        With ``TORCHREPRO_STOP_AT=K``, the K-th step saves and raises ``SystemExit(0)``. It
        only raises, so the script's own cleanup runs; a process group still initialised
        at interpreter exit is destroyed then (:mod:`torchrepro.core._teardown`), lest gloo's
        teardown abort the stopped rank.
        """
        self.steps += 1
        stopping = self.stop_at is not None and self.steps == self.stop_at
        if self.path is not None and (self.steps % self.every == 0 or stopping):
            self.save(extra)
        if stopping:
            raise SystemExit(0)


def _write_exit_state(ckpt: Checkpointer, path: Path) -> None:
    """At exit, under ``TORCHREPRO_EXIT_STATE``: the state the objects and RNGs end with.

    ``torchrepro check`` compares these files across runs: what a run exits with counts,
    whether or not a trace saw it (a final untraced update, a best-weights restore).
    """
    try:
        state = {name: obj.state_dict() for name, obj in ckpt.objects.items()}
        torch.save({"objects": state, "rng": get_rng_state()}, path)
    except Exception as exc:  # logged: at exit nobody is left to catch it
        log.warning("torchrepro: could not write the exit state %s: %s", path, exc)


def _report_no_progress(ref: weakref.ReferenceType[Checkpointer]) -> None:
    """At exit: a resumed Checkpointer that never stepped was already at the end of training."""
    ckpt = ref()
    if ckpt is None or ckpt._resumed_at is None or ckpt.steps != ckpt._resumed_at:
        return
    log.warning(
        "torchrepro: resumed from %s at step %d and no training step ran after it: the "
        "checkpoint was already at the end of training. Delete it (or set %s to another "
        "path) to train again.",
        ckpt.path,
        ckpt.steps,
        _envvars.CHECKPOINT,
    )
