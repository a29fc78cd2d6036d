"""Train a small CNN on scikit-learn's digits, bitwise reproducibly.

The plain PyTorch loop, plus five torchrepro lines (marked ``# torchrepro``). Run it twice,
with any num_workers, or stop and resume it: the trace and the final weights are identical.

    torchrepro check --vary num_workers=0,2 --resume-at 37 -- python examples/train_digits.py

Under torchrun it trains with DistributedDataParallel (gloo on CPU, NCCL on GPUs); each rank
loads ``batch_size / world_size`` samples of every global batch:

    torchrepro check -- torchrun --nproc-per-node 2 examples/train_digits.py

Environment: ``TORCHREPRO_SEED`` (default 0 here), and the variables ``torchrepro check``
sets (``TORCHREPRO_TRACE``, ``TORCHREPRO_CHECKPOINT``, ``TORCHREPRO_NUM_WORKERS``,
``TORCHREPRO_STOP_AT``).
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from sklearn.datasets import load_digits
from torch import nn

import torchrepro


class Digits(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """8x8 digit images with random augmentation drawn in ``__getitem__``."""

    def __init__(self, limit: int | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        self.images = torch.tensor(x[:limit], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        self.labels = torch.tensor(y[:limit])
        self.augment = T.Compose(
            [
                T.RandomAffine(degrees=10, translate=(0.1, 0.1)),
                T.RandomErasing(p=0.25, scale=(0.02, 0.1)),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.augment(self.images[index])  # torch's global RNG
        noise = np.random.normal(0.0, 0.05, size=image.shape).astype(
            np.float32
        )  # NumPy's global RNG
        return image + torch.from_numpy(noise), self.labels[index]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument(
        "--num-workers", type=int, default=2, help="TORCHREPRO_NUM_WORKERS overrides it"
    )
    parser.add_argument("--persistent-workers", action="store_true")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="resume from / save to this file (TORCHREPRO_CHECKPOINT overrides)",
    )
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument(
        "--bf16", action="store_true", help="CPU autocast to bfloat16, with a GradScaler"
    )
    parser.add_argument(
        "--save-final", default=None, help="write the final model/optimizer state here"
    )
    parser.add_argument(
        "--folk-recipe",
        action="store_true",
        help="load data the classic way (torch DataLoader, seeded generator and worker_init_fn), to compare",
    )
    return parser.parse_args(argv)


def folk_recipe_loader(dataset: Digits, **kwargs: Any) -> torch.utils.data.DataLoader[Any]:
    """The recipe from PyTorch's reproducibility notes: a seeded generator, seeded workers."""

    def seed_worker(worker_id: int) -> None:
        worker_seed = torch.initial_seed() % 2**32
        np.random.seed(worker_seed)
        random.seed(worker_seed)

    generator = torch.Generator()
    generator.manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset, worker_init_fn=seed_worker, generator=generator, **kwargs
    )


def setup_distributed() -> int:
    """Join the torchrun process group when launched by torchrun; return the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("TORCHREPRO_SEED", "0")
    torchrepro.seed_everything()  # torchrepro: the same initial weights on every rank
    torchrepro.deterministic("strict")  # torchrepro
    world = setup_distributed()
    if args.batch_size % world:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be divisible by the world size {world}"
        )

    loader_args: dict[str, Any] = {
        "batch_size": args.batch_size // world,
        "shuffle": True,
        "drop_last": True,
        "num_workers": args.num_workers,
        "persistent_workers": args.persistent_workers and args.num_workers > 0,
    }
    if args.folk_recipe:  # honour the checker's num_workers here too, for a fair comparison
        loader_args["num_workers"] = int(os.environ.get("TORCHREPRO_NUM_WORKERS", args.num_workers))
        loader_args["persistent_workers"] &= loader_args["num_workers"] > 0
        loader = folk_recipe_loader(Digits(args.limit), **loader_args)
    else:
        loader = torchrepro.DataLoader(Digits(args.limit), **loader_args)  # torchrepro
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=args.epochs * len(loader)
    )
    scaler = torch.amp.GradScaler("cpu", enabled=args.bf16)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
        torchrepro.seed_everything(per_rank=True)  # torchrepro: each rank its own dropout stream

    trace = torchrepro.Trace()  # torchrepro: records checksums when TORCHREPRO_TRACE is set
    objects = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "trace": trace,
    }
    if not args.folk_recipe:  # torch's DataLoader cannot save its position
        objects["loader"] = loader
    ckpt = torchrepro.Checkpointer(args.checkpoint, every=args.every, **objects)  # torchrepro
    ckpt.resume()

    loss = torch.zeros(())
    for _epoch in range(getattr(loader, "epoch", 0), args.epochs):
        model.train()
        for images, labels in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            trace.step(loss=loss, model=model)
            ckpt.step()

    model.eval()
    data = Digits(args.limit)
    with torch.no_grad():
        accuracy = (model(data.images).argmax(1) == data.labels).float().mean().item()
    if world == 1 or torch.distributed.get_rank() == 0:
        print(f"steps {ckpt.steps}  last loss {loss.item():.4f}  train accuracy {accuracy:.3f}")
    final = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if args.save_final and (world == 1 or torch.distributed.get_rank() == 0):
        torch.save(final, args.save_final)
    if world > 1:
        torch.distributed.destroy_process_group()
    return final


if __name__ == "__main__":
    main()
