"""Batches of NumPy arrays, with an id array that training never reads (issue 23, rule 8).

NUMPY_BATCH_SHIFT=N adds N to every id: the batches differ, the losses and the model do not.
A check must see that from the batch's content, not call the batches identical.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import torchrepro


def main() -> None:
    torchrepro.seed_everything()
    shift = int(os.environ.get("NUMPY_BATCH_SHIFT", "0"))
    rng = np.random.default_rng(0)
    features = rng.standard_normal((32, 4)).astype(np.float32)
    targets = rng.standard_normal((32, 1)).astype(np.float32)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = torchrepro.Trace()
    for step in range(4):
        rows = slice(8 * step, 8 * step + 8)
        batch = {"x": features[rows], "y": targets[rows], "id": np.arange(8) + 8 * step + shift}
        loss = torch.nn.functional.mse_loss(
            model(torch.from_numpy(batch["x"])), torch.from_numpy(batch["y"])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trace.step(loss=loss, model=model, batch=batch)


if __name__ == "__main__":
    main()
