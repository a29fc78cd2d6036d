"""The digits CNN of train_digits.py in a plain accelerate loop (no Trainer), bitwise reproducibly.

Plain accelerate plus torchrepro's accelerator and loader (lines marked ``# torchrepro``):

    torchrepro check --vary num_workers=0,2 --resume-at 21 -- python examples/train_accelerate.py

Under ``accelerate launch --cpu --num_processes 2`` each rank loads ``batch_size / world_size``
samples of every global batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import Digits, Net

import torchrepro
from torchrepro.integrations.accelerate import ReproAccelerator


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
    accelerator = ReproAccelerator(cpu=True)  # torchrepro: was Accelerator(); seeds first
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    loader = torchrepro.DataLoader(  # torchrepro: replaces torch.utils.data.DataLoader
        Digits(args.limit),
        batch_size=args.batch_size // accelerator.num_processes,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    resume = accelerator.resume_path()  # torchrepro: a stop recorded by torchrepro check
    if resume is not None:
        accelerator.load_state(resume)

    for _epoch in range(loader.epoch, args.epochs):  # torchrepro: loader.epoch, after a resume
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            accelerator.repro_step(loss=loss, model=model)  # torchrepro: trace; stop at K

    if accelerator.is_main_process:
        print(f"steps {accelerator.repro_steps}")
        if args.save_final:
            torch.save(accelerator.unwrap_model(model).state_dict(), args.save_final)


if __name__ == "__main__":
    main()
