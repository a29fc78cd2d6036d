"""Mid-epoch resume in Lightning with and without ReproCallback; prints the differing tensors as JSON.

Each training starts as a fresh process would (seeding first). Plain: the user's folk setup,
``lightning.seed_everything`` and a torchrepro.DataLoader, stopped with a checkpoint at step
``STOP`` and resumed with ``fit(ckpt_path=...)``. Repro: the same with ``ReproCallback`` (and
the resumed half with 2 workers instead of 0).
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import torchrepro
from torchrepro.data import _streams
from torchrepro.integrations.lightning import ReproCallback

STOP = 5  # of 16 steps: mid-epoch (8 batches per epoch)


class Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]  # augmentation from the global RNG


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Stopped(Exception):
    pass


class StopAt(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == STOP:
            trainer.save_checkpoint(self.path)
            raise Stopped


def train(repro: bool, workers: int, stop: str | None = None, resume: str | None = None) -> Any:
    _streams.reset_created()  # a fresh process: loaders are keyed by creation order
    callbacks: list[pl.Callback] = []
    if repro:
        callbacks.append(ReproCallback(seed=0, trace=False))
    else:
        pl.seed_everything(0, verbose=False)
    model = Module()
    loader = torchrepro.DataLoader(Noisy(), batch_size=8, shuffle=True, num_workers=workers, seed=0)
    if stop is not None:
        callbacks.append(StopAt(stop))
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    try:
        trainer.fit(model, loader, ckpt_path=resume)
    except Stopped:
        return None
    return model.state_dict()


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def main() -> None:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, repro, resumed_workers in (("plain", False, 0), ("repro", True, 2)):
            whole = train(repro, 0)
            path = f"{tmp}/{name}.ckpt"
            train(repro, 0, stop=path)
            resumed = train(repro, resumed_workers, resume=path)
            result[name] = differing(whole, resumed)
            result["tensors"] = len(whole)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
