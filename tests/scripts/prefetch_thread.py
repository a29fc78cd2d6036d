"""Batches from a prefetch thread (issue 23, rule 6): a thread iterates the loader into a
queue, the training loop takes them from it. How far the thread runs ahead depends on
timing (the loop sleeps a random few milliseconds per step); what the trace records must not.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import torch

import torchrepro


def batches(loader: torchrepro.DataLoader) -> queue.Queue[object]:
    out: queue.Queue[object] = queue.Queue(maxsize=3)

    def fill() -> None:
        for batch in loader:
            out.put(batch)
        out.put(None)

    threading.Thread(target=fill, daemon=True).start()
    return out


def main() -> None:
    torchrepro.seed_everything()
    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randn(24, 1))
    loader = torchrepro.DataLoader(data, batch_size=4, shuffle=True, num_workers=1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = torchrepro.Trace()
    ckpt = torchrepro.Checkpointer(
        "prefetch.pt", every=3, model=model, optimizer=optimizer, loader=loader, trace=trace
    )
    ckpt.resume()
    jitter = int.from_bytes(os.urandom(2), "little")
    for _epoch in range(loader.epoch, 2):
        fetched = batches(loader)
        while (batch := fetched.get()) is not None:
            x, y = batch
            time.sleep((jitter := (jitter * 75 + 74) % 65537) % 7 / 1000)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trace.step(loss=loss)
            ckpt.step()


if __name__ == "__main__":
    main()
