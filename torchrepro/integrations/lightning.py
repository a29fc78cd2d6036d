"""PyTorch Lightning: :class:`ReproCallback`, one callback for bitwise reproducible training.

Add it and train from a :class:`torchrepro.DataLoader`::

    repro = ReproCallback()                      # first: seeds, so the model is built the same way
    model, data = MyModule(), MyDataModule()     # its train_dataloader() returns a torchrepro.DataLoader
    trainer = L.Trainer(callbacks=[repro])
    trainer.fit(model, data, ckpt_path=repro.resume_path())

What it does, hook by hook:

- ``__init__``: seeds everything (:func:`torchrepro.seed_everything`) from ``seed``, else
  ``TORCHREPRO_SEED``, else ``PL_GLOBAL_SEED`` (set by ``lightning.seed_everything``), else a
  drawn and logged seed.
- ``setup`` (fit): sets deterministic algorithms (:func:`torchrepro.deterministic`; Lightning's
  ``Trainer(deterministic=None)`` leaves them alone, ``False`` would turn them off) and reseeds
  each rank's training streams from ``(seed, rank)``.
- ``on_train_start``: verifies that the training loader is a :class:`torchrepro.DataLoader`
  and that a stop recorded at ``TORCHREPRO_CHECKPOINT`` is resumed.
- ``state_dict``: every rank's RNG state (gathered, under DDP) and the trace's step count go
  into Lightning's checkpoint, whichever callback or call writes it (``ModelCheckpoint``,
  ``trainer.save_checkpoint``); Lightning itself saves the loader's position.
- ``load_state_dict`` / ``on_train_start``: when ``fit`` resumes (never for the reload of
  ``validate/test/predict(ckpt_path=...)``, which leaves the RNG and the fit's trace alone),
  each rank's RNG state is restored at the end of
  Lightning's start-up, before the first batch is fetched or transferred, which is where an
  uninterrupted run stands too (Lightning calls no ``on_train_epoch_start`` when it resumes
  mid-epoch, so that hook is too late).
- ``on_validation_start`` / ``on_validation_end``: validation runs with the RNG state saved
  and restored around it, so it never consumes training randomness (Lightning skips a
  validation that falls right after the step a checkpoint was saved at when it resumes).
- ``on_train_batch_end``: after each training batch in which the optimizers stepped (one
  step, however many optimizers a manual ``training_step`` steps; ``TORCHREPRO_STOP_AT`` and
  ``check --resume-at`` count these, not ``global_step``), a :class:`torchrepro.Trace` records the
  loss (a stack of the micro-batch losses with gradient accumulation) and the parameters;
  at ``TORCHREPRO_STOP_AT=K`` it saves with ``trainer.save_checkpoint`` next to
  ``TORCHREPRO_CHECKPOINT``, records the stop there, and ends the process with status 0.
  When step K is an epoch's last batch, the stop waits for where the default
  ``ModelCheckpoint`` saves (``on_validation_end`` of the epoch's validation, else
  ``on_train_epoch_end``), so the resumed run takes Lightning's epoch-end path as a resume
  from a real epoch-end checkpoint does.

Under DDP (torchrun, gloo or NCCL) ``use_distributed_sampler`` may stay at Lightning's
default ``True``: when Lightning rebuilds the loader with its ``DistributedSampler``, the
``torchrepro.DataLoader`` puts its own global-batch split in its place, and it reads the rank
when iteration starts, so it may be built before ``fit()``. ``False`` gives the same batches.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from .._errors import TorchreproError
from ..checkpoint._io import _agree
from ..core import _envvars
from ..core._determinism import deterministic as set_deterministic
from ..core._rng import get_rng_state, set_rng_state
from ..core._seed import seed_everything
from ..core._statedict import check_versioned
from ..data import DataLoader
from ..trace._trace import Trace
from . import _common

__all__ = ["ReproCallback"]

log = logging.getLogger("torchrepro")

STATE_VERSION = 1
_FRAMEWORK = "lightning"


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    loss = outputs.get("loss") if isinstance(outputs, dict) else None
    return loss.detach() if isinstance(loss, torch.Tensor) else None


def _loaders(value: Any) -> list[Any]:
    """The loaders inside what ``trainer.train_dataloader`` returns (a loader or a collection)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _loaders(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _loaders(v)]
    return [] if value is None else [value]


class ReproCallback(Callback):
    """Seeds, sets determinism, checkpoints every rank's RNG, traces, and honours ``check``.

    Args:
        seed: an int in ``[0, 2**64 - 1]``; ``None`` reads ``TORCHREPRO_SEED``, then
            ``PL_GLOBAL_SEED``, else draws one and logs it.
        trace: ``True`` records a :class:`torchrepro.Trace` at ``TORCHREPRO_TRACE`` (when
            set); a ``Trace`` records to it; ``False`` records nothing.
        deterministic: the mode passed to :func:`torchrepro.deterministic` at setup
            (``"strict"``, ``"warn"`` or ``"off"``).

    Side effects: seeds every global RNG and exports ``TORCHREPRO_SEED`` when created; at
    setup, sets the deterministic-algorithm flags and reseeds the global RNGs per rank.

    Raises:
        TypeError, ValueError: a bad argument or environment variable.

    >>> repro = ReproCallback(seed=0, trace=False)
    >>> repro.seed, repro.resume_path(default="last")  # no stop recorded: your own choice
    (0, 'last')
    """

    def __init__(
        self, seed: int | None = None, *, trace: bool | Trace = True, deterministic: str = "strict"
    ) -> None:
        _common.check_options(trace, deterministic)
        self.seed = seed_everything(_common.resolve_seed(seed, fallback_var="PL_GLOBAL_SEED"))
        self.trace: Trace | None = (
            trace if isinstance(trace, Trace) else (Trace() if trace else None)
        )
        self._mode = deterministic
        self._stop_at = _common.stop_step()
        self._resumed_from: str | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None
        # One step = one training batch after which the optimizers stepped, counted here only:
        # the trace, the stop and the resume record count these. Lightning's global_step counts
        # optimizer steps (several per batch with several optimizers in manual optimization).
        self._steps = 0
        self._global_step = 0  # trainer.global_step after the last counted batch
        self._losses: list[torch.Tensor] = []
        self._stage: str | None = None  # of the trainer call under way (fit, test, ...)
        # The stop step ended an epoch: stop where its checkpoint is saved.
        self._stop_pending = False

    # -- resuming --------------------------------------------------------------------------

    def resume_path(self, default: str | None = None) -> str | None:
        """The checkpoint ``fit(ckpt_path=...)`` should resume from.

        The Lightning checkpoint recorded at ``TORCHREPRO_CHECKPOINT`` by a stop, when there
        is one; else ``default`` (your own, e.g. ``"last"``).

        Raises:
            CheckpointError: the record at ``TORCHREPRO_CHECKPOINT`` is not a Lightning one
                or names a checkpoint that is gone.
        """
        found = _common.read_pointer(_FRAMEWORK)
        if found is None:
            return default
        self._resumed_from = found[0]
        return found[0]

    def _checkpoint_file(self) -> str:
        path = _common.pointer_path()
        if path is None:
            raise TorchreproError(
                f"{_envvars.STOP_AT} is set but {_envvars.CHECKPOINT} is not: set both, so the "
                "stopped run has somewhere to save"
            )
        return str(path.with_name(path.name + ".lightning.ckpt"))

    # -- hooks -----------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls setup before it restores a checkpoint, for every stage.
        self._stage = stage
        if stage != "fit":
            return
        self._steps = 0  # a resumed fit's checkpoint sets it next
        set_deterministic(self._mode)
        seed_everything(self.seed, per_rank=True)
        if self._stop_at is not None:
            self._checkpoint_file()  # fail now, not at the stop

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loaders(trainer)
        recorded = _common.read_pointer(_FRAMEWORK)
        if recorded is not None and trainer.ckpt_path is None:
            raise TorchreproError(
                f"{_envvars.CHECKPOINT} records a stop at step {recorded[1]} ({recorded[0]}), but "
                "fit() started afresh: pass ckpt_path=repro.resume_path() to trainer.fit"
            )
        self._global_step = trainer.global_step
        self._losses = []
        if self._pending_rng is not None:
            # Last of Lightning's start-up: after the restore, before the resumed epoch's
            # first batch is fetched or transferred (Lightning calls no epoch-start hook
            # when it resumes mid-epoch).
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _check_loaders(self, trainer: pl.Trainer) -> None:
        loaders = _loaders(trainer.train_dataloader)
        others = [type(x).__name__ for x in loaders if not isinstance(x, DataLoader)]
        if others or not loaders:
            raise TorchreproError(
                f"ReproCallback needs the training data from a torchrepro.DataLoader, got "
                f"{', '.join(others) or 'no loader'}: return torchrepro.DataLoader(...) from "
                "train_dataloader(), so batches do not depend on num_workers and a mid-epoch "
                "resume continues at the exact sample"
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before_validation = get_rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before_validation is not None:
            set_rng_state(self._before_validation)
            self._before_validation = None
        if self._stop_pending and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            self._losses.append(loss)
        if trainer.global_step == self._global_step:  # accumulating: no optimizer step yet
            return
        self._global_step = trainer.global_step
        self._steps += 1
        step = self._steps
        losses, self._losses = self._losses, []
        if self.trace is not None:
            recorded = losses[0] if len(losses) == 1 else (torch.stack(losses) if losses else None)
            self.trace.step(loss=recorded, model=pl_module)
        if self._stop_at is not None and step == self._stop_at:
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # The epoch's last batch: stop where the default ModelCheckpoint saves (after the
                # epoch's validation, else at the epoch's end), so the resumed run takes the path
                # a real epoch-end checkpoint takes, not Lightning's mid-epoch one.
                self._stop_pending = True
            else:
                self._stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_pending:
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        target = self._checkpoint_file()
        trainer.save_checkpoint(target)
        _common.write_pointer(_FRAMEWORK, self._steps, target)
        log.info(
            "torchrepro: saved the Lightning checkpoint %s after training batch %d (epoch %d, "
            "global_step %d); stopping (%s)",
            target,
            self._steps,
            trainer.current_epoch,
            trainer.global_step,
            _envvars.STOP_AT,
        )
        _common.leave_process_group()
        raise SystemExit(0)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every rank's RNG state (a collective under DDP), the step count and the trace's state."""
        _rank, world = _common.world()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "world_size": world,
            "step": self._steps,
            "rng": _agree(get_rng_state()),
            "trace": None if self.trace is None else self.trace.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's RNG state for the resumed epoch's start; continue the trace.

        Only when the checkpoint is loaded to resume ``fit``: ``validate``, ``test`` and
        ``predict(ckpt_path=...)`` reload weights, not training, so the RNG and the trace of
        the fit stay as they are (every trained step stays traced and compared).

        Raises:
            TorchreproError: the checkpoint was saved with another seed or world size.
        """
        if self._stage not in (None, "fit"):
            return
        state = check_versioned(
            state_dict, what="ReproCallback", version=STATE_VERSION, made_by="ReproCallback"
        )
        rank, world = _common.world()
        if state.get("world_size") != world or len(state.get("rng", [])) != world:
            raise TorchreproError(
                f"the checkpoint was saved by {state.get('world_size')} processes, this run has "
                f"{world}: resume with the same number of processes for a bitwise continuation"
            )
        if state.get("seed") != self.seed:
            raise TorchreproError(
                f"the checkpoint was saved by a run with seed {state.get('seed')}, this run has "
                f"seed {self.seed}: resume with the same seed ({_envvars.SEED} or seed=)"
            )
        self._pending_rng = state["rng"][rank]
        self._steps = int(state.get("step", 0))
        trace_state = state.get("trace")
        if self.trace is not None and trace_state is not None:
            self.trace.load_state_dict(trace_state)
        _common.note_resumed(self._steps)
