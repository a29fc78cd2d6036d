"""A tiny training script for `torchrepro check` tests (no torchvision: starts fast).

Environment knobs for the tests:
    TINY_NUDGE_MARKER=path  the second run (the marker exists) nudges a weight by one ulp
    TINY_NUDGE=1            every run nudges it (a deterministic difference, for --vary)
    TINY_NUDGE_STEP=N       ... at step N only, after its update (default 7)
    TINY_CRASH=1            raise at step 3
    TINY_NO_TRACE=1         never create a Trace
    TINY_NO_CHECKPOINT=1    never create a Checkpointer
    TINY_NO_RESUME=1        create a Checkpointer but forget to call resume()
    TINY_TRACE_NOT_SAVED=1  leave the Trace out of the checkpoint (its numbering restarts)
    TINY_TORCH_LOADER=1     torch's own DataLoader (ignores TORCHREPRO_NUM_WORKERS)
    TINY_FIXED_SEED=1       seed_everything(0): ignores TORCHREPRO_SEED
    TINY_UNSEEDED=1         perturb the model from os.urandom (every run differs)
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
    torchrepro.seed_everything(0 if os.environ.get("TINY_FIXED_SEED") else None)
    torchrepro.deterministic("strict")
    nudge_marker = os.environ.get("TINY_NUDGE_MARKER")
    nudge = os.environ.get("TINY_NUDGE") == "1"
    if nudge_marker:
        nudge = nudge or os.path.exists(nudge_marker)
        open(nudge_marker, "a").close()
    nudge_step = int(os.environ.get("TINY_NUDGE_STEP", "7"))

    x, y = torch.randn(64, 4), torch.randn(64, 1)
    if os.environ.get("TINY_TORCH_LOADER"):
        loader = torch.utils.data.DataLoader(Noisy(x, y), batch_size=8, shuffle=True)
        loader.epoch = 0  # type: ignore[attr-defined]
    else:
        loader = torchrepro.DataLoader(Noisy(x, y), batch_size=8, shuffle=True, num_workers=0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
    )
    if os.environ.get("TINY_UNSEEDED"):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        with torch.no_grad():
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=g))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trace = None if os.environ.get("TINY_NO_TRACE") else torchrepro.Trace()
    ckpt = None
    if not os.environ.get("TINY_NO_CHECKPOINT"):
        objects = {"model": model, "optimizer": optimizer}
        if not os.environ.get("TINY_TORCH_LOADER"):
            objects["loader"] = loader
        if trace is not None and not os.environ.get("TINY_TRACE_NOT_SAVED"):
            objects["trace"] = trace
        ckpt = torchrepro.Checkpointer("tiny.pt", every=5, **objects)
        if not os.environ.get("TINY_NO_RESUME"):
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
