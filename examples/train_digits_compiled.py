"""Train a small network on scikit-learn's digits with ``torch.compile``, bitwise reproducibly.

``train_digits.py`` with the model compiled (an MLP with dropout, to keep the compile
short: ~40 s cold on 2 CPU cores, a few seconds from a warm Inductor cache). Every
torchrepro line is marked ``# torchrepro``; the compiled run is bitwise identical run to
run, with a cold or a warm cache, with any num_workers, and stopped and resumed:

    torchrepro check --vary num_workers=0,2 --resume-at 20 -- python examples/train_digits_compiled.py

It is not bitwise equal to the same script without ``torch.compile``: compiled kernels fuse
and reorder float operations, and compiled dropout draws its masks with Inductor's own
generator (seeded from torch's, so it still follows ``seed_everything``). Checkpoints load
into either, since torchrepro saves the module's own state-dict keys (no ``_orig_mod.``).

On CPU, Inductor needs a C++ compiler (``g++``). Environment: as ``train_digits.py``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from digits import Digits, accuracy
from torch import nn

import torchrepro


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="resume from / save to this file")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--save-final", default=None, help="write the final state here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torchrepro.seed_everything()  # torchrepro: TORCHREPRO_SEED, or a drawn seed it prints
    # torchrepro: deterministic kernels; also Inductor's deterministic mode (checked below)
    torchrepro.deterministic("strict")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    loader = torchrepro.DataLoader(  # torchrepro: replaces torch.utils.data.DataLoader
        Digits(args.limit),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # one batch shape: no recompilation for a short last batch
        num_workers=args.num_workers,  # TORCHREPRO_NUM_WORKERS replaces it
    )
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)
    ).to(device)
    model = torch.compile(net, mode=args.mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)

    trace = torchrepro.Trace()  # torchrepro: verifies determinism at the first compiled step
    ckpt = torchrepro.Checkpointer(  # torchrepro: the compiled model saves as the module
        args.checkpoint,
        every=args.every,
        model=model,
        optimizer=optimizer,
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
            trace.step(loss=loss, model=model)  # torchrepro: names without _orig_mod.
            ckpt.step()  # torchrepro: count the step; save every `every` steps

    # The eager module shares the compiled model's parameters: evaluating it on the whole
    # set (another batch shape, eval mode) compiles nothing more.
    print(f"steps {ckpt.steps}  train accuracy {accuracy(net, Digits(args.limit), device):.3f}")
    if args.save_final:  # for the tests: the final state, to compare bitwise
        torch.save(
            {"model": net.state_dict(), "optimizer": optimizer.state_dict()}, args.save_final
        )


if __name__ == "__main__":
    main()
