"""One rank of a torch.distributed (gloo) data-loading run, for tests/test_distributed.py.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test):
    python dist_data.py OUT.pt GLOBAL_BATCH NUM_WORKERS
Rank 0 writes, for drop_last False and True, every global batch as {index: tensor} per rank,
the loader states seen by every rank, and dropout-like draws with and without per_rank.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
import torch.distributed as dist

import torchrepro


class Augmented(torch.utils.data.Dataset[tuple[int, torch.Tensor]]):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        noise = torch.rand(3) + float(np.random.rand()) + random.random()
        return i, noise


def main() -> None:
    out, global_batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    result: dict[str, object] = {"world": world}
    torchrepro.seed_everything(7)
    for drop_last in (False, True):
        loader = torchrepro.DataLoader(
            Augmented(),
            batch_size=global_batch // world,
            shuffle=True,
            drop_last=drop_last,
            num_workers=workers,
        )
        epochs = []
        states = []
        for _epoch in range(2):
            batches = []
            for indices, tensors in loader:
                mine = {int(i): t for i, t in zip(indices, tensors, strict=True)}
                gathered: list[object] = [None] * world
                dist.all_gather_object(gathered, mine)
                batches.append(gathered)
                state: list[object] = [None] * world
                dist.all_gather_object(state, loader.state_dict())
                states.append(state)
            epochs.append(batches)
        result[f"drop_last={drop_last}"] = {"epochs": epochs, "states": states, "len": len(loader)}
    for per_rank in (False, True):
        torchrepro.seed_everything(7, per_rank=per_rank)
        mask = torch.nn.functional.dropout(torch.ones(16), 0.5)
        gathered_masks: list[object] = [None] * world
        dist.all_gather_object(gathered_masks, mask)
        result[f"per_rank={per_rank}"] = gathered_masks
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
