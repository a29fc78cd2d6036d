"""One rank of the checkpoint fault scenarios, for tests/test_hardening_dist.py.

python dist_faults.py DIR     # writes DIR/rank<r>.json: scenario -> outcome and seconds taken

Each scenario is a mistake one rank makes (or a fault one rank meets) while the other
behaves; the caller catches the exception, as a training script might, and goes on.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

import torchrepro
from torchrepro import CheckpointError


class Counter:
    def __init__(self, n: int = 0, fail_on: int | None = None) -> None:
        self.n, self.fail_on = n, fail_on

    def state_dict(self) -> dict[str, int]:
        if self.fail_on == dist.get_rank():
            raise RuntimeError("boom in state_dict")
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results: dict[str, dict[str, object]] = {}

    def attempt(name: str, step) -> None:  # type: ignore[no-untyped-def]
        start = time.monotonic()
        try:
            step()
            outcome = "ok"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        results[name] = {"outcome": outcome, "seconds": time.monotonic() - start}

    attempt(
        "state_dict fails on rank 1",
        lambda: torchrepro.save_checkpoint(out / "a.pt", c=Counter(fail_on=1)),
    )
    attempt(
        "bad extra on rank 1",
        lambda: torchrepro.save_checkpoint(
            out / "b.pt", extra={"acc": np.float64(0.5)} if rank == 1 else {}, c=Counter()
        ),
    )
    attempt("different paths", lambda: torchrepro.save_checkpoint(out / f"p{rank}.pt", c=Counter()))
    attempt("good save", lambda: torchrepro.save_checkpoint(out / "good.pt", c=Counter(5)))
    attempt(
        "rank 1 loads a missing path",
        lambda: torchrepro.load_checkpoint(
            out / ("good.pt" if rank == 0 else "gone.pt"), c=Counter()
        ),
    )
    # Where the file is read: the checkpoint format's module.
    owner, name = torchrepro.checkpoint._file, "read"
    real_read = getattr(owner, name)

    def unreadable(path):  # type: ignore[no-untyped-def]
        raise CheckpointError(f"cannot open checkpoint {str(path)!r}: Permission denied")

    if rank == 1:
        setattr(owner, name, unreadable)
    attempt("rank 1 cannot read", lambda: torchrepro.load_checkpoint(out / "good.pt", c=Counter()))
    setattr(owner, name, real_read)
    attempt("good load", lambda: torchrepro.load_checkpoint(out / "good.pt", c=Counter()))
    if rank == 0:  # the `if rank == 0: torch.save(...)` habit; rank 1 goes on
        attempt("only rank 0 saves", lambda: torchrepro.save_checkpoint(out / "r0.pt", c=Counter()))
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
