"""A Trace saved with the Checkpointer, whose counts still part (issue 23, rule 8).

RESUME_COUNTS selects the loop:
    ckpt_first  ckpt.step() before trace.step(): the stop at K comes before step K is traced
    micro       trace.step() per micro-batch, ckpt.step() per optimizer step (2 micro-batches)
    (unset)     trace.step() then ckpt.step(), once per step: a correct resume
"""

from __future__ import annotations

import os

import torch

import torchrepro


def main() -> None:
    torchrepro.seed_everything()
    mode = os.environ.get("RESUME_COUNTS", "")
    micro = 2 if mode == "micro" else 1
    data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randn(48, 1))
    loader = torchrepro.DataLoader(data, batch_size=4, shuffle=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = torchrepro.Trace()
    ckpt = torchrepro.Checkpointer(
        "counts.pt", every=3, model=model, optimizer=optimizer, loader=loader, trace=trace
    )
    ckpt.resume()
    for index, (x, y) in enumerate(loader):
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss / micro).backward()
        if mode == "micro":
            trace.step(loss=loss)
        if (index + 1) % micro:
            continue
        optimizer.step()
        optimizer.zero_grad()
        if mode == "ckpt_first":
            ckpt.step()
            trace.step(loss=loss, model=model)
        elif mode == "micro":
            ckpt.step()
        else:
            trace.step(loss=loss, model=model)
            ckpt.step()


if __name__ == "__main__":
    main()
