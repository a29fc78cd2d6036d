"""examples/train_digits_compiled.py with a planted nondeterminism, tiny: for check on torch.compile.

PLANT=module  a module adding an offset drawn from os.urandom after the ReLU (it becomes
              module ``3``, UnseededNoise, of the compiled MLP): every run differs at step 1
PLANT unset   the example as it is

320 images, batch 64, one epoch: 5 steps, a checkpoint every 2 steps, no worker processes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_digits_compiled as example


class UnseededNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # a constant of this process, so compiled code bakes it in: no graph break
        self.offset = 1e-3 * int.from_bytes(os.urandom(2), "little") / 2**16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def main() -> None:
    plant = os.environ.get("PLANT", "")
    if plant == "module":
        init = nn.Sequential.__init__

        def planted_init(self: nn.Sequential, *modules: Any) -> None:
            if len(modules) == 5 and isinstance(modules[2], nn.ReLU):  # the example's MLP
                modules = (*modules[:3], UnseededNoise(), *modules[3:])
            init(self, *modules)

        nn.Sequential.__init__ = planted_init  # type: ignore[method-assign]
    elif plant:
        raise SystemExit(f"PLANT must be 'module' or unset, got {plant!r}")
    example.main(["--limit", "320", "--epochs", "1", "--num-workers", "0", "--every", "2"])


if __name__ == "__main__":
    main()
