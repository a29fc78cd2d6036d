"""A tiny training script for `torchrepro check` tests (no torchvision: starts fast).

Environment knobs for the tests:
    TINY_NUDGE_MARKER=path  the second run (the marker exists) nudges a weight by one ulp
    TINY_NUDGE_STEP=N       ... at step N only (default 7)
    TINY_CRASH=1            raise at step 3
    TINY_NO_TRACE=1         never create a Trace
    TINY_NO_CHECKPOINT=1    never create a Checkpointer
"""

from __future__ import annotations

import os

import torch

import torchrepro


class Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def main() -> None:
    torchrepro.seed_everything()
    torchrepro.deterministic("strict")
    nudge_marker = os.environ.get("TINY_NUDGE_MARKER")
    nudge = False
    if nudge_marker:
        nudge = os.path.exists(nudge_marker)
        open(nudge_marker, "a").close()
    nudge_step = int(os.environ.get("TINY_NUDGE_STEP", "7"))

    x, y = torch.randn(64, 4), torch.randn(64, 1)
    loader = torchrepro.DataLoader(Noisy(x, y), batch_size=8, shuffle=True, num_workers=0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trace = None if os.environ.get("TINY_NO_TRACE") else torchrepro.Trace()
    ckpt = None
    if not os.environ.get("TINY_NO_CHECKPOINT"):
        objects = {"model": model, "optimizer": optimizer, "loader": loader}
        if trace is not None:
            objects["trace"] = trace
        ckpt = torchrepro.Checkpointer("tiny.pt", every=5, **objects)
        ckpt.resume()
    step = ckpt.steps if ckpt else 0
    for _epoch in range(loader.epoch, 2):
        for xb, yb in loader:
            step += 1
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 3 and os.environ.get("TINY_CRASH"):
                raise RuntimeError("tiny_train crashed on purpose")
            if nudge and step == nudge_step:
                with torch.no_grad():
                    w = model[3].weight
                    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
            if trace is not None:
                trace.step(loss=loss, model=model)
            if ckpt is not None:
                ckpt.step()


if __name__ == "__main__":
    main()
