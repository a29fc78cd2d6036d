"""A tiny GAN in Lightning's manual optimization (two optimizers per batch) under ReproCallback.

Run under ``torchrepro check --resume-at K``: Lightning's ``global_step`` rises by 2 per batch
here, while a torchrepro step is one training batch. 2 epochs of 8 batches.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import torchrepro
from torchrepro.data import _streams
from torchrepro.integrations.lightning import ReproCallback


class GAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1)
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.generator(torch.randn(batch.shape[0], 2))  # noise from the global RNG
        real_loss = bce(self.discriminator(batch), torch.ones(batch.shape[0], 1))
        fake_loss = bce(self.discriminator(fake.detach()), torch.zeros(batch.shape[0], 1))
        opt_d.zero_grad()
        self.manual_backward(real_loss + fake_loss)
        opt_d.step()
        g_loss = bce(self.discriminator(fake), torch.ones(batch.shape[0], 1))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.SGD(self.discriminator.parameters(), lr=1e-2),
        )


def train(epochs: int = 2, ckpt_path: str | None = None) -> tuple[GAN, pl.Trainer]:
    _streams.reset_created()  # a fresh process: loaders are keyed by creation order
    repro = ReproCallback(seed=0)
    model = GAN()
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1)) + 3
    loader = torchrepro.DataLoader(data, batch_size=8, shuffle=True, seed=0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[repro],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path or repro.resume_path())
    return model, trainer


if __name__ == "__main__":
    train()
