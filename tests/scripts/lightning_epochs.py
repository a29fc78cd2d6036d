"""Two epochs of 8 batches under ReproCallback with no validation, for ``torchrepro check``.

Without validation the default ModelCheckpoint saves at each training epoch's end, and
Lightning resumes such a checkpoint by its epoch-end path (it does not reload the loader's
position): a ``--resume-at 8`` must stop there too.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl

import torchrepro
from torchrepro.integrations.lightning import ReproCallback

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from lightning_resume import Module, Noisy


def main() -> None:
    repro = ReproCallback(seed=0)
    model = Module()
    loader = torchrepro.DataLoader(Noisy(), batch_size=8, shuffle=True, seed=0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[repro],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader, ckpt_path=repro.resume_path())


if __name__ == "__main__":
    main()
