"""What a run exits with, beyond its trace (issue 23, rules 2, 3 and 7).

The trace sees only the loss (trace.step() gets no model). An EMA copy (AveragedModel) is
kept out of the Checkpointer and saved to ema.pt at the end, as people export it.
EXIT_NUDGE=1 changes the model after the last traced step (a final untraced update).
"""

from __future__ import annotations

import os

import torch

import torchrepro


def main() -> None:
    torchrepro.seed_everything()
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    loader = torchrepro.DataLoader(data, batch_size=4, shuffle=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = torch.optim.swa_utils.AveragedModel(model)
    trace = torchrepro.Trace()
    ckpt = torchrepro.Checkpointer(
        "exit.pt", every=4, model=model, optimizer=optimizer, loader=loader, trace=trace
    )
    ckpt.resume()
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        trace.step(loss=loss)
        ckpt.step()
    if os.environ.get("EXIT_NUDGE") == "1":
        with torch.no_grad():
            model.bias.add_(1e-3)
    torch.save(ema.state_dict(), "ema.pt")


if __name__ == "__main__":
    main()
