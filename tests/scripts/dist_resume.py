"""One rank of a resume across world sizes, for tests/test_distributed.py.

python dist_resume.py save CKPT OUT K     # iterate K batches, save a checkpoint
python dist_resume.py load CKPT OUT       # strict load (expect an error), then strict=False
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

import torchrepro

BATCH = 4  # per rank


def main() -> None:
    mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    torchrepro.seed_everything(3)
    loader = torchrepro.DataLoader(list(range(100)), batch_size=BATCH, shuffle=True, drop_last=True)
    result: dict[str, object] = {}
    if mode == "save":
        it = iter(loader)
        for _ in range(int(sys.argv[4])):
            next(it)
        torchrepro.save_checkpoint(ckpt, loader=loader)
        result["state"] = loader.state_dict()
    else:
        try:
            torchrepro.load_checkpoint(ckpt, loader=loader)
        except torchrepro.CheckpointError as exc:
            result["strict_error"] = str(exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torchrepro.load_checkpoint(ckpt, strict=False, loader=loader)
        result["warnings"] = [str(w.message) for w in caught]
        result["state"] = loader.state_dict()
        result["next"] = next(iter(loader)).tolist()
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
