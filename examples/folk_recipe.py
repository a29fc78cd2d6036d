"""train_digits.py seeded the usual way instead of with torchrepro, to compare the two.

The recipe from PyTorch's reproducibility notes: seed ``random``, NumPy and torch, turn on
deterministic algorithms, and give torch's DataLoader a seeded ``generator`` and a
``worker_init_fn`` that seeds each worker. It repeats a run exactly, as long as nothing
changes; change ``num_workers`` and every step differs:

    torchrepro check --vary num_workers=0,2 -- python examples/folk_recipe.py

The only torchrepro line is the Trace, so that ``torchrepro check`` can compare the runs.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from digits import Digits, Net, accuracy

import torchrepro


def seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args(argv)
    # What `torchrepro check --vary num_workers=...` sets; read here too, for a fair comparison.
    workers = int(os.environ.get("TORCHREPRO_NUM_WORKERS", args.num_workers))

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    generator = torch.Generator()
    generator.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        Digits(args.limit),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        worker_init_fn=seed_worker,
        generator=generator,
    )
    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=args.epochs * len(loader)
    )
    trace = torchrepro.Trace()  # torchrepro: per-step checksums when TORCHREPRO_TRACE is set

    for _epoch in range(args.epochs):
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            trace.step(loss=loss, model=model)  # torchrepro

    print(f"train accuracy {accuracy(model, Digits(args.limit), device):.3f}")


if __name__ == "__main__":
    main()
