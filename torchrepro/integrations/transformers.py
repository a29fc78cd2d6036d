"""Hugging Face ``Trainer``: swap in :class:`ReproTrainer` for bitwise reproducible training.

::

    torchrepro.seed_everything()        # before the model is built, so it is built the same way
    model = build_model()
    trainer = ReproTrainer(model=model, args=args, train_dataset=dataset)   # was: Trainer(...)
    trainer.train()

:class:`ReproTrainerMixin` does the same for another ``Trainer`` subclass
(``class MyTrainer(ReproTrainerMixin, SFTTrainer)``). What it changes:

- **Training data from a** :class:`torchrepro.DataLoader` (``get_train_dataloader``), built
  from the same arguments (batch size, collator with unused columns removed, ``num_workers``,
  ``drop_last``, pinning, persistence, prefetching, ``train_sampling_strategy`` random or
  sequential). It **bypasses** ``accelerator.prepare`` for the training loader only: prepare
  would rebuild it (losing the per-sample seeding and the position) and re-shard it. The
  model and optimizer still go through accelerate, so **mixed precision** (``bf16``/``fp16``),
  **gradient accumulation** and **DDP under torchrun** work as before; the loader gives each
  rank its part of every global batch itself and the Trainer moves each batch to the
  device. What is lost: accelerate's ``split_batches``, ``dispatch_batches`` and
  ``train_sampling_strategy="group_by_length"``/``"batch_rebalance"`` (refused with an error),
  ``data_seed`` (torchrepro's seed orders the data) and TPU (XLA) device loaders.
- **Resume in O(1)**: ``ignore_data_skip`` is set, so the Trainer neither rebuilds the loader
  with ``skip_first_batches`` nor loads the skipped batches; the loader's own
  ``load_state_dict`` continues at the exact sample. Each ``checkpoint-N/`` gets a
  ``torchrepro.pt`` with the loader's position, the trace's state and every rank's RNG state
  (gathered to rank 0 under DDP); this rank's RNG state is restored when the resumed epoch's
  first batches are requested (``get_batch_samples``), after the Trainer's own RNG restore and
  before any batch is fetched. (The Trainer's own path restores RNG only after fetching.)
- **Evaluation** runs with the RNG state saved and restored around it, so it never consumes
  training randomness and its loader's workers do not matter.
- **Trace**: the loss of each optimizer step (a stack of the micro-batch losses with gradient
  accumulation) and the parameters, to ``TORCHREPRO_TRACE``.
- **Seeds and determinism**: at construction, every global RNG is seeded per rank from
  ``TORCHREPRO_SEED`` (else ``args.seed``), and :func:`torchrepro.deterministic` is applied.
- ``TORCHREPRO_STOP_AT=K`` saves the Trainer's own ``checkpoint-K/`` at optimizer step K,
  records it at ``TORCHREPRO_CHECKPOINT`` and ends the process with status 0; ``train()``
  with no ``resume_from_checkpoint`` resumes from the checkpoint recorded there.

- **Its own output_dir under check**: when ``TORCHREPRO_CHECKPOINT`` (else ``TORCHREPRO_TRACE``)
  is set, as ``torchrepro check`` does for each run, ``args.output_dir`` is set to a folder
  beside it (logged): scripts that resume from the last checkpoint in ``output_dir`` (such as
  HF's ``run_glue.py``) never find another run's, and your ``output_dir`` is left alone.
- **IterableDataset**: resumed bitwise when the dataset has ``state_dict()`` and
  ``load_state_dict()`` and ``dataloader_num_workers=0``; otherwise, when the run saves
  checkpoints, ``train()`` refuses before the first step.

A mid-epoch resume with ``gradient_accumulation_steps > 1`` needs the epoch's batch count to
be a multiple of it (the Trainer would skip the optimizer step of a partial last group after
a resume it did not fast-forward itself); otherwise ``train()`` raises before training.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .._errors import TorchreproError
from ..checkpoint._io import load_checkpoint, save_checkpoint
from ..core import _envvars
from ..core._determinism import deterministic as set_deterministic
from ..core._rng import get_rng_state, isolated_rng, set_rng_state
from ..core._seed import seed_everything
from ..data import DataLoader
from ..trace._trace import Trace
from . import _common

__all__ = ["ReproTrainer", "ReproTrainerCallback", "ReproTrainerMixin"]

log = logging.getLogger("torchrepro")

_FRAMEWORK = "transformers"
STATE_FILE = "torchrepro.pt"


class ReproTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """The checkpoint, trace and stop side of :class:`ReproTrainerMixin` (added by it).

    On ``on_train_begin`` it loads ``checkpoint-N/torchrepro.pt`` when the run resumes; on
    ``on_step_end`` it traces the step and, at ``TORCHREPRO_STOP_AT``, asks the Trainer to
    save and stop; on ``on_save`` it writes ``torchrepro.pt`` into the new checkpoint folder.
    """

    def __init__(self, trainer: ReproTrainerMixin) -> None:
        self._trainer = trainer
        self._stop_at = _common.stop_step()
        self._stopping = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer._repro_load()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer._repro_trace_step()
        if self._stop_at is not None and state.global_step == self._stop_at:
            control.should_save = True
            control.should_training_stop = True
            self._stopping = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._trainer._repro_save(folder, state.global_step)
        if self._stopping:
            _common.write_pointer(_FRAMEWORK, state.global_step, folder)
            log.info("torchrepro: saved step %d to %s; stopping", state.global_step, folder)
            _common.leave_process_group()
            raise SystemExit(0)


def _redirect_output_dir(args: Any) -> None:
    """Under ``torchrepro check``, give this run its own ``output_dir`` (see the module's docs)."""
    folder = _common.run_output_dir(_FRAMEWORK)
    if folder is None or args is None or not hasattr(args, "output_dir"):
        return
    log.warning(
        "torchrepro: output_dir=%r -> %s for this run (%s is set): runs under torchrepro "
        "check never read each other's checkpoints, and your own output_dir is left alone",
        args.output_dir,
        folder,
        _envvars.CHECKPOINT if _common.pointer_path() is not None else _envvars.TRACE,
    )
    args.output_dir = str(folder)


class ReproTrainerMixin:
    """Put it before a ``transformers.Trainer`` (sub)class: see the module's documentation.

    Args (keyword-only, besides the Trainer's own):
        deterministic: the mode for :func:`torchrepro.deterministic` (``"strict"``,
            ``"warn"``, ``"off"``).
        trace: ``True`` traces to ``TORCHREPRO_TRACE`` (when set); a :class:`torchrepro.Trace`
            traces to it; ``False`` records nothing.

    Side effects: seeds every global RNG per rank and exports ``TORCHREPRO_SEED``; sets the
    deterministic-algorithm flags; sets ``args.ignore_data_skip = True``.

    Raises:
        TypeError, ValueError: a bad argument or environment variable.
    """

    args: Any
    train_dataset: Any
    data_collator: Any
    model: Any

    def __init__(
        self, *args: Any, deterministic: str = "strict", trace: bool | Trace = True, **kwargs: Any
    ) -> None:
        _common.check_options(trace, deterministic)
        _redirect_output_dir(args[1] if len(args) > 1 else kwargs.get("args"))
        super().__init__(*args, **kwargs)
        if not self.args.ignore_data_skip:
            log.info("torchrepro: ignore_data_skip=True; the loader resumes at its exact position")
            self.args.ignore_data_skip = True
        seed = _common.resolve_seed(None)
        self.repro_seed = seed_everything(self.args.seed if seed is None else seed, per_rank=True)
        set_deterministic(deterministic)
        self.repro_trace: Trace | None = (
            trace if isinstance(trace, Trace) else (Trace() if trace else None)
        )
        self._repro_loader: DataLoader[Any] | None = None
        self._repro_resume: str | None = None
        self._repro_pending_rng: dict[str, Any] | None = None
        self._repro_losses: list[torch.Tensor] = []
        self.add_callback(ReproTrainerCallback(self))  # type: ignore[attr-defined]

    # -- data ------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader[Any]:
        """A :class:`torchrepro.DataLoader` over ``train_dataset``, not passed to accelerate."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        args = self.args
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy not in ("random", "sequential"):
            raise TorchreproError(
                f"train_sampling_strategy={strategy!r} needs the Trainer's own sampler, which "
                "torchrepro.DataLoader does not take: use 'random' or 'sequential'"
            )
        config = getattr(args, "accelerator_config", None)
        for name in ("split_batches", "dispatch_batches"):
            if getattr(config, name, None):
                raise TorchreproError(
                    f"accelerator_config.{name}=True re-shards the training loader inside "
                    "accelerate, which ReproTrainer bypasses: leave it unset (each rank's "
                    "torchrepro.DataLoader loads its own part of every global batch)"
                )
        dataset, collator = self._repro_columns(self.train_dataset, self.data_collator)
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        kwargs: dict[str, Any] = {
            "batch_size": getattr(self, "_train_batch_size", args.per_device_train_batch_size),
            "shuffle": strategy == "random" and not iterable,
            "collate_fn": collator,
            "drop_last": args.dataloader_drop_last,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
        }
        if args.dataloader_num_workers > 0:
            kwargs["persistent_workers"] = args.dataloader_persistent_workers and not iterable
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
            context = getattr(args, "dataloader_multiprocessing_context", None)
            if context is not None:
                kwargs["multiprocessing_context"] = context
        self._repro_loader = DataLoader(dataset, **kwargs)
        if iterable:
            self._repro_check_iterable(dataset)
        return self._repro_loader

    def _repro_check_iterable(self, dataset: Any) -> None:
        """Before training: an IterableDataset whose position a checkpoint cannot hold is refused."""
        strategy = getattr(self.args.save_strategy, "value", self.args.save_strategy)
        if strategy == "no" and _common.stop_step() is None:
            return  # no checkpoint is saved, so none needs the position
        assert self._repro_loader is not None
        try:
            self._repro_loader.state_dict()
        except TorchreproError as error:
            raise TorchreproError(
                f"ReproTrainer: train_dataset is an IterableDataset ({type(dataset).__name__}) "
                f"whose position a checkpoint cannot record ({error}), and this run saves "
                f"checkpoints (save_strategy={strategy!r}"
                + (f", {_envvars.STOP_AT}" if _common.stop_step() is not None else "")
                + "): a resume from them would not continue at the exact sample. Give the "
                "dataset state_dict()/load_state_dict() and dataloader_num_workers=0, pass a "
                "map-style datasets.Dataset / torch Dataset, or set save_strategy='no'"
            ) from error

    def _repro_columns(self, dataset: Any, collator: Any) -> tuple[Any, Any]:
        """The Trainer's removal of the columns the model does not take (its helpers, when present)."""
        try:
            import datasets  # the Trainer's own optional dependency

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset and hasattr(self, "_remove_unused_columns"):
            return self._remove_unused_columns(dataset, description="training"), collator
        if hasattr(self, "_get_collator_with_removed_columns"):
            return dataset, self._get_collator_with_removed_columns(
                collator, description="training"
            )
        return dataset, collator

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        if self._repro_pending_rng is not None:
            # After the Trainer's own RNG restore, before the first resumed batch is fetched.
            set_rng_state(self._repro_pending_rng)
            self._repro_pending_rng = None
        return super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]

    # -- training --------------------------------------------------------------------------

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; with no checkpoint given, resume from the one ``TORCHREPRO_CHECKPOINT`` records."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No valid checkpoint found in output directory ({self.args.output_dir})"
                )
        if resume_from_checkpoint in (None, False):
            recorded = _common.read_pointer(_FRAMEWORK)
            resume_from_checkpoint = None if recorded is None else recorded[0]
        self._repro_resume = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        if isinstance(loss, torch.Tensor):
            self._repro_losses.append(loss.detach())
        return loss

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with isolated_rng():  # evaluation never consumes training randomness
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    # -- called by ReproTrainerCallback ----------------------------------------------------

    def _repro_objects(self) -> dict[str, Any]:
        if self._repro_loader is None:
            raise TorchreproError(
                "ReproTrainer's training loader was not built: do not override "
                "get_train_dataloader below ReproTrainerMixin"
            )
        objects: dict[str, Any] = {"loader": self._repro_loader}
        if self.repro_trace is not None:
            objects["trace"] = self.repro_trace
        return objects

    def _repro_load(self) -> None:
        self._repro_losses = []
        if self._repro_resume is None:
            return
        path = os.path.join(self._repro_resume, STATE_FILE)
        if not os.path.exists(path):
            raise TorchreproError(
                f"checkpoint {self._repro_resume!r} has no {STATE_FILE}: it was not saved by "
                "ReproTrainer, so its data position and RNG states are unknown; resume from a "
                "checkpoint ReproTrainer saved"
            )
        extra = load_checkpoint(path, **self._repro_objects())
        # load_checkpoint restored this rank's RNG state last; the Trainer restores its own
        # copy at the epoch's start, so ours is set again right before the first fetch.
        self._repro_pending_rng = get_rng_state()
        step = int(extra.get("global_step", 0))
        _common.note_resumed(step)
        accumulation = int(self.args.gradient_accumulation_steps)
        loader = self._repro_loader
        assert loader is not None
        position = loader.state_dict().get("batches_received", 0)
        if accumulation > 1 and position and len(loader) % accumulation:
            raise TorchreproError(
                f"resuming mid-epoch with gradient_accumulation_steps={accumulation} and "
                f"{len(loader)} batches per epoch (not a multiple): after a resume the Trainer "
                "would skip the optimizer step of the epoch's last, partial group. Use a batch "
                "count divisible by gradient_accumulation_steps (dataloader_drop_last, dataset "
                "size) or save at epoch ends"
            )

    def _repro_trace_step(self) -> None:
        losses, self._repro_losses = self._repro_losses, []
        if self.repro_trace is None:
            return
        loss = losses[0] if len(losses) == 1 else (torch.stack(losses) if losses else None)
        self.repro_trace.step(loss=loss, model=self.model)

    def _repro_save(self, folder: str, step: int) -> None:
        save_checkpoint(
            os.path.join(folder, STATE_FILE),
            extra={"global_step": step, "seed": self.repro_seed},
            **self._repro_objects(),
        )


class ReproTrainer(ReproTrainerMixin, Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` made bitwise reproducible: see the module's documentation."""
