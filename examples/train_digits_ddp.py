"""train_digits.py under torchrun, with DistributedDataParallel: NCCL on GPUs, gloo on CPU.

The plain loop of ``train_digits.py`` plus what a distributed run adds (marked ``# DDP``);
every torchrepro line is marked ``# torchrepro``. Each rank loads ``batch_size / world_size``
samples of every global batch; which samples form a global batch, and how each is
augmented, do not depend on the world size.

    torchrun --nproc-per-node 2 examples/train_digits_ddp.py
    torchrepro check --vary num_workers=0,2 --resume-at 5 -- \\
        torchrun --nproc-per-node 2 examples/train_digits_ddp.py --limit 256 --batch-size 32

It also runs as a single process (world size 1, no DDP).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from digits import Digits, Net, accuracy
from torch import nn

import torchrepro


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="global: summed over ranks")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="resume from / save to this file")
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Every rank must use the same seed: a seed drawn on each rank would differ.
    os.environ.setdefault("TORCHREPRO_SEED", "0")
    torchrepro.seed_everything()  # torchrepro: the same initial weights on every rank
    torchrepro.deterministic("strict")  # torchrepro: deterministic kernels, cuDNN, cuBLAS

    world = int(os.environ.get("WORLD_SIZE", "1"))  # DDP: set by torchrun
    device = torch.device("cpu")
    if torch.cuda.is_available():  # DDP: one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:  # DDP
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by {world} ranks")

    loader = torchrepro.DataLoader(  # torchrepro: splits each global batch among the ranks
        Digits(args.limit),
        batch_size=args.batch_size // world,  # DDP: per rank
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,  # TORCHREPRO_NUM_WORKERS replaces it
    )
    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=args.epochs * len(loader)
    )
    net: nn.Module = model
    if world > 1:  # DDP
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        torchrepro.seed_everything(per_rank=True)  # torchrepro: each rank its own dropout

    trace = (
        torchrepro.Trace()
    )  # torchrepro: per-step checksums (rank 0) when TORCHREPRO_TRACE is set
    ckpt = torchrepro.Checkpointer(  # torchrepro: every rank, the same path
        args.checkpoint,
        every=args.every,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        trace=trace,
    )
    ckpt.resume()  # torchrepro: continue from the checkpoint, if there is one

    for _epoch in range(loader.epoch, args.epochs):  # torchrepro: loader.epoch, after resume
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            trace.step(loss=loss, model=model)  # torchrepro: record this step's checksums
            ckpt.step()  # torchrepro: count the step; save every `every` steps

    if world == 1 or torch.distributed.get_rank() == 0:
        score = accuracy(model, Digits(args.limit), device)
        print(f"steps {ckpt.steps}  ranks {world}  train accuracy {score:.3f}")
    if world > 1:  # DDP
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
