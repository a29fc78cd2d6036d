"""Train a small CNN on scikit-learn's digits, bitwise reproducibly: a template to copy.

A plain PyTorch loop; every torchrepro line is marked ``# torchrepro``. Run it twice, with
any num_workers, or stop and resume it: the trace and the final weights are identical.

    torchrepro check --vary num_workers=0,2 --resume-at 37 -- python examples/train_digits.py

Runs on the GPU when there is one. Its variants, each a small file of its own:
``train_digits_ddp.py`` (torchrun, DistributedDataParallel), ``train_digits_bf16.py``
(bfloat16 autocast with a GradScaler) and ``folk_recipe.py`` (the usual seeding recipe
instead of torchrepro, to compare). The data and model are in ``digits.py``.

Environment: ``TORCHREPRO_SEED`` (unset: a seed is drawn and printed), and the variables
``torchrepro check`` sets (``TORCHREPRO_TRACE``, ``TORCHREPRO_CHECKPOINT``,
``TORCHREPRO_NUM_WORKERS``, ``TORCHREPRO_STOP_AT``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from digits import Digits, Net, accuracy

import torchrepro


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--persistent-workers", action="store_true")
    parser.add_argument("--checkpoint", default=None, help="resume from / save to this file")
    parser.add_argument("--every", type=int, default=20, help="checkpoint every N steps")
    parser.add_argument("--save-final", default=None, help="write the final state here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # First of all: the model's initial weights and the data order draw from the RNGs.
    torchrepro.seed_everything()  # torchrepro: TORCHREPRO_SEED, or a drawn seed it prints
    torchrepro.deterministic("strict")  # torchrepro: deterministic kernels, cuDNN, cuBLAS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    loader = torchrepro.DataLoader(  # torchrepro: replaces torch.utils.data.DataLoader
        Digits(args.limit),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,  # TORCHREPRO_NUM_WORKERS replaces it
        persistent_workers=args.persistent_workers and args.num_workers > 0,
    )
    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=args.epochs * len(loader)
    )

    trace = torchrepro.Trace()  # torchrepro: per-step checksums when TORCHREPRO_TRACE is set
    ckpt = torchrepro.Checkpointer(  # torchrepro: saves all of these, RNGs included
        args.checkpoint,  # TORCHREPRO_CHECKPOINT replaces it; None and unset: no checkpoints
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
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            trace.step(loss=loss, model=model)  # torchrepro: record this step's checksums
            ckpt.step()  # torchrepro: count the step; save every `every` steps

    print(f"steps {ckpt.steps}  train accuracy {accuracy(model, Digits(args.limit), device):.3f}")
    if args.save_final:  # for the tests: the final state, to compare bitwise
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.save_final
        )


if __name__ == "__main__":
    main()
