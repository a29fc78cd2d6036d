"""The digits CNN of train_digits.py in PyTorch Lightning, bitwise reproducibly.

Plain Lightning plus torchrepro's callback and loader (lines marked ``# torchrepro``):

    torchrepro check --vary num_workers=0,2 --resume-at 21 -- python examples/train_lightning.py

Under torchrun (gloo on CPU) each rank loads ``batch_size / world_size`` samples of every
global batch (the loader puts its own global-batch split in place of Lightning's
DistributedSampler):

    torchrun --nproc-per-node 2 examples/train_lightning.py
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import Digits, Net

import torchrepro
from torchrepro.integrations.lightning import ReproCallback


class DigitsModule(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = Net()
        self.lr = lr

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self.net(images), labels), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)


class DigitsData(pl.LightningDataModule):
    def __init__(self, limit: int | None, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.limit, self.batch_size, self.num_workers = limit, batch_size, num_workers

    def train_dataloader(self) -> torchrepro.DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        return torchrepro.DataLoader(  # torchrepro: built here, after the process group exists
            Digits(self.limit),
            batch_size=self.batch_size // world,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> torchrepro.DataLoader:
        return torchrepro.DataLoader(Digits(self.limit), batch_size=128)  # torchrepro


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=512, help="use the first N images only")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="TORCHREPRO_NUM_WORKERS overrides it"
    )
    parser.add_argument("--save-final", default=None, help="write the final weights here")
    args = parser.parse_args(argv)

    os.environ.setdefault("TORCHREPRO_SEED", "0")
    repro = ReproCallback()  # torchrepro: first, so the model below is built the same every run
    model = DigitsModule()
    data = DigitsData(args.limit, args.batch_size, args.num_workers)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        callbacks=[repro],  # torchrepro
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
    )
    trainer.fit(model, data, ckpt_path=repro.resume_path())  # torchrepro: resume a stopped run
    if args.save_final and trainer.global_rank == 0:
        torch.save(model.state_dict(), args.save_final)
    if trainer.global_rank == 0:
        print(f"steps {trainer.global_step}")


if __name__ == "__main__":
    main()
