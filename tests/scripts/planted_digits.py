"""The bundled example (examples/train_digits.py) with a planted nondeterminism, tiny and fast.

PLANT=module  a module adding noise from an unseeded generator after ``features.2`` (ReLU):
              it becomes ``features.3`` (UnseededNoise); the data are untouched
PLANT=module-late  the same module, silent before step 4 (its call count is a buffer, so
              it is checkpointed): the runs part at step 4, after a checkpoint at step 2
PLANT=data    the dataset owns an unseeded ``random.Random`` that shifts each image: the
              batches differ, per-sample seeding cannot reach it (the loader warns)
PLANT unset   the example as it is

192 images, batch 32, one epoch: 6 steps, a checkpoint every 2 steps, no worker processes.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_digits as example


class UnseededNoise(nn.Module):
    def __init__(self, start: int = 1) -> None:
        super().__init__()
        self.gen = torch.Generator()
        self.gen.seed()  # from the OS: differs in every process
        self.start = start
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(self.calls) < self.start:
            return x
        return x + 1e-3 * torch.randn(x.shape, generator=self.gen)


class ShiftedDigits(example.Digits):
    def __init__(self, limit: int | None = None) -> None:
        super().__init__(limit)
        self.rng = random.Random()  # unseeded, and owned by the dataset

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = super().__getitem__(index)
        return image + self.rng.uniform(-0.01, 0.01), label


def main() -> None:
    plant = os.environ.get("PLANT", "")
    if plant in ("module", "module-late"):
        init = example.Net.__init__

        def planted_init(self: example.Net) -> None:
            init(self)
            self.features.insert(3, UnseededNoise(start=4 if plant == "module-late" else 1))

        example.Net.__init__ = planted_init  # type: ignore[method-assign]
    elif plant == "data":
        example.Digits = ShiftedDigits  # type: ignore[misc]
    elif plant:
        raise SystemExit(f"PLANT must be 'module', 'module-late', 'data' or unset, got {plant!r}")
    example.main(
        [
            "--limit",
            "192",
            "--batch-size",
            "32",
            "--epochs",
            "1",
            "--num-workers",
            "0",
            "--every",
            "2",
        ]
    )


if __name__ == "__main__":
    main()
