"""train_digits.py with bfloat16 autocast and a GradScaler (marked ``# bf16``).

The scaler's state is checkpointed with the rest, so a stopped and resumed run still ends
bitwise identical to one that never stopped:

    torchrepro check --resume-at 37 -- python examples/train_digits_bf16.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from digits import Digits, Net, accuracy

import torchrepro


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
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
    torchrepro.seed_everything()  # torchrepro: first, before the model and data draw from RNGs
    torchrepro.deterministic("strict")  # torchrepro
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    loader = torchrepro.DataLoader(  # torchrepro
        Digits(args.limit),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        persistent_workers=args.persistent_workers and args.num_workers > 0,
    )
    model = Net().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=args.epochs * len(loader)
    )
    scaler = torch.amp.GradScaler(device.type)  # bf16

    trace = torchrepro.Trace()  # torchrepro
    ckpt = torchrepro.Checkpointer(  # torchrepro
        args.checkpoint,
        every=args.every,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,  # bf16: the scaler's state is part of the run
        loader=loader,
        trace=trace,
    )
    ckpt.resume()  # torchrepro

    for _epoch in range(loader.epoch, args.epochs):  # torchrepro: loader.epoch
        model.train()
        for images, labels in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16):  # bf16
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            scaler.scale(loss).backward()  # bf16
            scaler.step(optimizer)  # bf16
            scaler.update()  # bf16
            scheduler.step()
            trace.step(loss=loss, model=model)  # torchrepro
            ckpt.step()  # torchrepro

    print(f"steps {ckpt.steps}  train accuracy {accuracy(model, Digits(args.limit), device):.3f}")
    if args.save_final:  # for the tests: the final state, to compare bitwise
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.save_final
        )


if __name__ == "__main__":
    main()
