"""Resume faults people copy (issue 23, rules 5 and 9): the resumed run parts from the
uninterrupted one while runs with identical settings agree.

RESUME_FAULT selects the fault:
    scheduler     the LambdaLR is left out of the Checkpointer (its schedule restarts)
    accumulation  Checkpointer.step() per micro-batch of a 2-micro-batch accumulation, so a
                  stop at an odd step loses the accumulated .grad
    (unset)       neither: a correct resume
"""

from __future__ import annotations

import os

import torch

import torchrepro


def main() -> None:
    torchrepro.seed_everything()
    torchrepro.deterministic("strict")
    fault = os.environ.get("RESUME_FAULT", "")
    micro = 2 if fault == "accumulation" else 1
    data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randn(48, 1))
    loader = torchrepro.DataLoader(data, batch_size=4, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)
    trace = torchrepro.Trace(state_every=4)
    objects = {"model": model, "optimizer": optimizer, "loader": loader, "trace": trace}
    if fault != "scheduler":
        objects["scheduler"] = scheduler
    ckpt = torchrepro.Checkpointer("faults.pt", every=4, **objects)
    ckpt.resume()
    for index, (x, y) in enumerate(loader, start=ckpt.steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss / micro).backward()
        if (index + 1) % micro == 0:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        trace.step(loss=loss, model=model)
        ckpt.step()


if __name__ == "__main__":
    main()
