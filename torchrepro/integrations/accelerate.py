"""accelerate without a Trainer: :class:`ReproAccelerator`, a drop-in ``accelerate.Accelerator``.

::

    accelerator = ReproAccelerator()             # was: Accelerator(); seeds, so the model is the same
    model, optimizer = build_model(), build_optimizer()
    loader = torchrepro.DataLoader(dataset, batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if (path := accelerator.resume_path()) is not None:
        accelerator.load_state(path)              # a stop recorded by torchrepro check
    for epoch in range(loader.epoch, epochs):     # the loader's epoch, after a resume
        for batch in loader:
            ...; accelerator.backward(loss); optimizer.step(); optimizer.zero_grad()
            accelerator.repro_step(loss=loss, model=model)   # trace; stop at TORCHREPRO_STOP_AT

What it changes:

- ``prepare()`` keeps a :class:`torchrepro.DataLoader` instead of rebuilding it. accelerate's
  own wrapping (``prepare_data_loader``) builds a new ``DataLoaderShard`` from the loader's
  attributes: it takes the sampler out of its loader (so the per-sample seeding and the
  position are lost, and torchrepro refuses the foreign iteration), under several processes
  re-shards it with ``BatchSamplerShard`` and synchronises a sampler generator, and
  ``skip_first_batches`` resumes by rebuilding again and *loading* the skipped batches. The
  returned loader moves each batch to ``accelerator.device``, tells accelerate's gradient
  accumulation where the epoch ends, and otherwise is the torchrepro loader (``epoch``,
  ``state_dict``...). Under several processes the torchrepro loader gives each rank its part of
  every global batch itself. Other loaders are prepared by accelerate as before.
- ``skip_first_batches(loader, n)`` returns the loader unchanged when ``load_state`` already
  put it ``n`` batches into its epoch (a resume in O(1)), and refuses any other ``n``.
- ``save_state(dir)`` also writes ``dir/torchrepro.pt``: the loaders' positions, the trace's
  state and every rank's RNG state; ``load_state(dir)`` restores them after accelerate's own.
- ``repro_step(loss=, model=)``: call it once per optimizer step (one step per batch that
  stepped, however many optimizers); it records a :class:`torchrepro.Trace` step and, at
  ``TORCHREPRO_STOP_AT=K``, saves with ``save_state`` beside ``TORCHREPRO_CHECKPOINT``,
  records the stop there and ends the process with status 0; ``resume_path()`` names it.
- Construction seeds every global RNG per rank (``seed=``, else ``TORCHREPRO_SEED``, else a
  drawn, logged seed) and applies :func:`torchrepro.deterministic`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from accelerate.utils import send_to_device

from .._errors import TorchreproError
from ..checkpoint._io import load_checkpoint, save_checkpoint
from ..core import _envvars
from ..core._determinism import deterministic as set_deterministic
from ..core._seed import seed_everything
from ..data import DataLoader
from ..trace._trace import Trace
from . import _common

__all__ = ["ReproAccelerator"]

log = logging.getLogger("torchrepro")

_FRAMEWORK = "accelerate"
STATE_FILE = "torchrepro.pt"


class _PreparedLoader(DataLoaderStateMixin):  # type: ignore[misc]
    """What ``ReproAccelerator.prepare`` returns for a torchrepro loader: the loader, on the device.

    Every other attribute (``epoch``, ``state_dict``, ``set_epoch``...) is the loader's own.
    """

    def __init__(self, loader: DataLoader[Any], device: torch.device, placement: bool) -> None:
        self.loader = loader
        self.device = device
        self.placement = placement
        self.gradient_state = GradientState()
        self._drop_last = loader.drop_last

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        self.reset()  # the remainder stays -1: the loader's own batches are never padded
        # Where the epoch ends, for accelerate's gradient accumulation (its own loader looks
        # one batch ahead, which would move the saved position one batch on): counted from
        # the position a resume restored.
        last = self._batches_left() if self.gradient_state.num_steps > 1 else None
        self.gradient_state._add_dataloader(self)
        try:
            for received, batch in enumerate(self.loader, start=1):
                self.end_of_dataloader = received == last
                yield send_to_device(batch, self.device) if self.placement else batch
        finally:
            self.gradient_state._remove_dataloader(self)

    def _batches_left(self) -> int | None:
        """Batches left in this pass; None when the loader cannot say (an unsized iterable)."""
        try:
            return len(self.loader) - int(self.loader.state_dict().get("batches_received", 0))
        except (TypeError, TorchreproError):
            return None


class ReproAccelerator(Accelerator):  # type: ignore[misc]
    """``accelerate.Accelerator`` made bitwise reproducible: see the module's documentation.

    Args (keyword-only, besides the Accelerator's own):
        seed: an int in ``[0, 2**64 - 1]``; ``None`` reads ``TORCHREPRO_SEED``, else draws one
            and logs it.
        trace: ``True`` traces to ``TORCHREPRO_TRACE`` (when set); a :class:`torchrepro.Trace`
            traces to it; ``False`` records nothing.
        deterministic: the mode for :func:`torchrepro.deterministic`.

    Side effects: seeds every global RNG per rank and exports ``TORCHREPRO_SEED``; sets the
    deterministic-algorithm flags.

    Raises:
        TypeError, ValueError: a bad argument or environment variable.
    """

    def __init__(
        self,
        *args: Any,
        seed: int | None = None,
        trace: bool | Trace = True,
        deterministic: str = "strict",
        **kwargs: Any,
    ) -> None:
        _common.check_options(trace, deterministic)
        super().__init__(*args, **kwargs)  # starts the process group under accelerate launch
        self.repro_seed = seed_everything(_common.resolve_seed(seed), per_rank=True)
        set_deterministic(deterministic)
        self.repro_trace: Trace | None = (
            trace if isinstance(trace, Trace) else (Trace() if trace else None)
        )
        self.repro_steps = 0  # optimizer steps: one per repro_step()
        self._repro_loaders: list[DataLoader[Any]] = []
        self._repro_stop_at = _common.stop_step()
        self._repro_resumed = False

    # -- data ------------------------------------------------------------------------------

    def prepare_data_loader(
        self, data_loader: Any, device_placement: bool | None = None, **kwargs: Any
    ) -> Any:
        """A torchrepro loader stays itself (moved batches to the device); others as accelerate does."""
        if not isinstance(data_loader, DataLoader):
            return super().prepare_data_loader(data_loader, device_placement, **kwargs)
        self._repro_loaders.append(data_loader)
        placement = self.device_placement if device_placement is None else device_placement
        return _PreparedLoader(data_loader, self.device, placement)

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        """``dataloader`` itself when ``load_state`` already put it ``num_batches`` into its epoch.

        Raises:
            TorchreproError: a torchrepro loader at another position.
        """
        if not isinstance(dataloader, _PreparedLoader):
            return super().skip_first_batches(dataloader, num_batches)
        position = int(dataloader.loader.state_dict().get("batches_received", 0))
        if num_batches not in (0, position):
            raise TorchreproError(
                f"skip_first_batches(dataloader, num_batches={num_batches}): the "
                f"torchrepro.DataLoader stands at batch {position} of its epoch (load_state "
                "restores its position, so no batch needs skipping): drop the "
                "skip_first_batches call, or pass the position load_state restored"
            )
        return dataloader

    # -- state -----------------------------------------------------------------------------

    def _repro_objects(self) -> dict[str, Any]:
        objects: dict[str, Any] = {
            ("loader" if i == 0 else f"loader_{i}"): loader
            for i, loader in enumerate(self._repro_loaders)
        }
        if self.repro_trace is not None:
            objects["trace"] = self.repro_trace
        return objects

    def save_state(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> Any:
        """accelerate's ``save_state``, plus ``torchrepro.pt``: loader positions, RNG, trace."""
        location = super().save_state(output_dir, *args, **kwargs)
        save_checkpoint(
            os.path.join(location, STATE_FILE),
            extra={"steps": self.repro_steps, "seed": self.repro_seed},
            **self._repro_objects(),
        )
        return location

    def load_state(self, input_dir: str | None = None, *args: Any, **kwargs: Any) -> Any:
        """accelerate's ``load_state``, then the loaders' positions, RNG and trace.

        Raises:
            TorchreproError: no ``input_dir`` given, or it holds no ``torchrepro.pt``.
        """
        if input_dir is None:
            raise TorchreproError(
                "ReproAccelerator.load_state needs input_dir (the folder save_state returned), "
                "so the torchrepro state is read from the same checkpoint as accelerate's"
            )
        path = os.path.join(input_dir, STATE_FILE)
        if not os.path.exists(path):
            raise TorchreproError(
                f"checkpoint {input_dir!r} has no {STATE_FILE}: it was not saved by "
                "ReproAccelerator.save_state, so its data position and RNG states are unknown; "
                "resume from a checkpoint ReproAccelerator saved"
            )
        result = super().load_state(input_dir, *args, **kwargs)
        extra = load_checkpoint(path, **self._repro_objects())  # restores the RNG states last
        self.repro_steps = int(extra.get("steps", 0))
        self._repro_resumed = True
        _common.note_resumed(self.repro_steps)
        return result

    # -- steps and the recorded stop -------------------------------------------------------

    def resume_path(self, default: str | None = None) -> str | None:
        """The folder to ``load_state`` from: a stop recorded at ``TORCHREPRO_CHECKPOINT``, else ``default``.

        Raises:
            CheckpointError: the record is not an accelerate one, or names a folder that is gone.
        """
        found = _common.read_pointer(_FRAMEWORK)
        return default if found is None else found[0]

    def repro_step(
        self, loss: torch.Tensor | None = None, model: torch.nn.Module | None = None
    ) -> None:
        """Count one optimizer step, trace it, and stop at ``TORCHREPRO_STOP_AT`` (see the module).

        Raises:
            TorchreproError: a stop is recorded at ``TORCHREPRO_CHECKPOINT`` but this run did
                not ``load_state`` it.
        """
        if self.repro_steps == 0 and not self._repro_resumed:
            recorded = _common.read_pointer(_FRAMEWORK)
            if recorded is not None:
                raise TorchreproError(
                    f"{_envvars.CHECKPOINT} records a stop at step {recorded[1]} ({recorded[0]}), "
                    "but training started afresh: call accelerator.load_state("
                    "accelerator.resume_path()) after prepare()"
                )
        self.repro_steps += 1
        if self.repro_trace is not None:
            unwrapped = None if model is None else self.unwrap_model(model)
            self.repro_trace.step(loss=None if loss is None else loss.detach(), model=unwrapped)
        if self._repro_stop_at is not None and self.repro_steps == self._repro_stop_at:
            anchor = _common.pointer_path()
            if anchor is None:
                raise TorchreproError(
                    f"{_envvars.STOP_AT} is set but {_envvars.CHECKPOINT} is not: set both, so "
                    "the stopped run has somewhere to save"
                )
            folder = self.save_state(str(anchor.with_name(anchor.name + ".accelerate")))
            _common.write_pointer(_FRAMEWORK, self.repro_steps, folder)
            log.info(
                "torchrepro: save_state(%s) at step %d; stopping (%s)",
                folder,
                self.repro_steps,
                _envvars.STOP_AT,
            )
            _common.leave_process_group()
            raise SystemExit(0)
