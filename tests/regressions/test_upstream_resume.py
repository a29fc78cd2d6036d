"""Open resume bugs of the frameworks that torchrepro claims to fix, one test each.

Each test runs the framework's own documented resume pattern twice: alone, where the upstream
bug makes the resumed run differ from an uninterrupted one (asserted, so that a fix upstream
shows up here), and with torchrepro, where it is bitwise identical.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

import torchrepro
from torchrepro.data import _streams


class _Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """32 samples with an augmentation from the global RNG."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=gen)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> Any:
    names = ("TORCHREPRO_SEED", "TORCHREPRO_CHECKPOINT", "TORCHREPRO_STOP_AT", "TORCHREPRO_TRACE")
    # and what the frameworks' own seeding exports
    exported = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "PYTORCH_NVML_BASED_CUDA_CHECK")
    for name in names + exported:
        monkeypatch.setenv(name, "")  # so that monkeypatch restores it, whoever sets it
        monkeypatch.delenv(name)
    settings = torchrepro.deterministic("strict")
    yield monkeypatch
    settings.restore()


# -- accelerate ----------------------------------------------------------------------------


# huggingface/accelerate#2016 (open): "Dataloader yields incorrect sequence after resuming from
# checkpointing": save_state inside epoch >= 1, then load_state + skip_first_batches (the
# pattern of accelerate's examples/by_feature/checkpointing.py) resumes on another epoch's order.
@pytest.mark.rng_changes
@pytest.mark.parametrize("repro", [False, True])
def test_accelerate_2016_resume_inside_the_second_epoch(clean, tmp_path, repro):
    accelerate = pytest.importorskip("accelerate")
    from torchrepro.integrations.accelerate import ReproAccelerator

    state = str(tmp_path / "state")

    def run(stop: tuple[int, int] | None = None, resume: tuple[int, int] | None = None) -> Any:
        _streams.reset_created()  # a fresh process: loaders are keyed by creation order
        if repro:
            accelerator = ReproAccelerator(cpu=True, seed=0, trace=False)
            loader: Any = torchrepro.DataLoader(torch.arange(12), batch_size=3, shuffle=True)
        else:
            accelerator = accelerate.Accelerator(cpu=True)
            accelerate.utils.set_seed(0)
            loader = torch.utils.data.DataLoader(torch.arange(12), batch_size=3, shuffle=True)
        loader = accelerator.prepare(loader)
        first_epoch, skip = 0, 0
        if resume is not None:
            accelerator.load_state(state)
            first_epoch, skip = resume
        seen = []
        for epoch in range(first_epoch, 2):
            batches = (
                accelerator.skip_first_batches(loader, skip) if epoch == first_epoch else loader
            )
            for i, batch in enumerate(batches):
                seen.append(batch.tolist())
                if (epoch, i + 1) == stop:
                    accelerator.save_state(state)
                    return seen
        return seen

    whole = run()
    resumed = run(stop=(1, 2)) + run(resume=(1, 2))  # epoch 1, after its 2nd batch of 4
    assert len(whole) == len(resumed) == 8
    assert (whole == resumed) is repro


# -- Lightning -----------------------------------------------------------------------------


class _Stop(Exception):
    pass


# Lightning-AI/pytorch-lightning#18780 (open): resuming from a checkpoint saved before the epoch
# ended "can cause unreliable results": a plain DataLoader restarts its shuffle and augmentation
# streams, so the resumed run trains on other samples than an uninterrupted one.
@pytest.mark.rng_changes
@pytest.mark.parametrize("repro", [False, True])
def test_lightning_18780_mid_epoch_resume(clean, tmp_path, repro):
    pl = pytest.importorskip("lightning.pytorch")
    from torchrepro.integrations.lightning import ReproCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:  # of 8, mid-epoch (4 batches per epoch)
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                raise _Stop

    def run(stop: bool = False, resume: bool = False) -> dict[str, torch.Tensor]:
        _streams.reset_created()  # a fresh process: loaders are keyed by creation order
        callbacks: list[Any] = [StopAt()] if stop else []
        if repro:
            callbacks.insert(0, ReproCallback(seed=0, trace=False))
            loader: Any = torchrepro.DataLoader(_Noisy(), batch_size=8, shuffle=True, seed=0)
        else:
            pl.seed_everything(0, verbose=False)
            loader = torch.utils.data.DataLoader(_Noisy(), batch_size=8, shuffle=True)
        model = Module()
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with contextlib.suppress(_Stop):
            trainer.fit(model, loader, ckpt_path=str(tmp_path / "mid.ckpt") if resume else None)
        return model.state_dict()

    whole = run()
    run(stop=True)
    assert (_differing(whole, run(resume=True)) == []) is repro


# -- transformers --------------------------------------------------------------------------


class _Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.noisy = _Noisy()

    def __len__(self) -> int:
        return len(self.noisy)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.noisy[i]
        return {"x": x, "labels": y}


class _HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


# huggingface/transformers#11323 (open): "substantially different results from restarting from
# a checkpoint and without": a mid-epoch resume of the Trainer restores its RNG only after it
# fetched the first resumed batch, so augmentation and dropout continue on other draws.
@pytest.mark.rng_changes
@pytest.mark.parametrize("repro", [False, True])
def test_transformers_11323_mid_epoch_resume(clean, tmp_path, repro):
    transformers = pytest.importorskip("transformers")
    from torchrepro.integrations.transformers import ReproTrainer

    class StopAt(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:  # of 8, mid-epoch (4 batches per epoch)
                control.should_save = True
                control.should_training_stop = True

    def run(out: str, stop: bool = False, resume: str | None = None) -> dict[str, torch.Tensor]:
        _streams.reset_created()  # a fresh process: loaders are keyed by creation order
        transformers.set_seed(0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=8,
            num_train_epochs=2,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        cls = ReproTrainer if repro else transformers.Trainer
        trainer = cls(
            model=_HFModel(),
            args=args,
            train_dataset=_Pairs(),
            callbacks=[StopAt()] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    whole = run("whole")
    run("stopped", stop=True)
    resumed = run("stopped", resume=str(tmp_path / "stopped" / "checkpoint-3"))
    assert (_differing(whole, resumed) == []) is repro
