"""First-batch and resume time, and peak memory, of torchrepro's own shuffled order against
the dataset size n: the Feistel order (new loaders) and the old ``randperm`` order (states
saved before it), the old one only up to ``--max-old`` samples (it needs 8 bytes per sample).

Each measurement runs in a fresh process, so the peak resident memory (``ru_maxrss``) is its
own; the figure printed is the peak minus the resident memory before building the loader.
The times are each process's first batch (cold: they include torch's first-use costs, a few
ms); a warm first batch of a new epoch in a running process is cheaper.

    python benchmarks/shuffle_scale.py [--max-old 300000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from torch.utils.data import Dataset

BATCH = 256


class Sized(Dataset[int]):
    """n samples that cost nothing to load: what is measured is the order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(n: int, permutation: str) -> dict[str, float]:
    """One process: the first batch of epoch 1, then a resume at 90% of it."""
    from torchrepro.data import DataLoader

    def build() -> DataLoader:
        return DataLoader(Sized(n), batch_size=BATCH, shuffle=True, seed=0)

    before = _rss_mib()
    loader = build()
    loader.set_epoch(1)
    if permutation == "randperm":  # a state without "permutation": the old order
        state = loader.state_dict()
        del state["permutation"]
        loader.load_state_dict(state)
    start = time.perf_counter()
    next(iter(loader))
    first = time.perf_counter() - start
    state = loader.state_dict()
    state["batches_received"] = int(0.9 * (n // BATCH))
    state["samples_consumed"] = state["batches_received"] * BATCH
    if permutation == "randperm":
        del state["permutation"]
    resumed = build()
    start = time.perf_counter()
    resumed.load_state_dict(state)
    next(iter(resumed))
    resume = time.perf_counter() - start
    return {"first_ms": first * 1e3, "resume_ms": resume * 1e3, "peak_mib": _rss_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-old", type=float, default=3e8, help="largest n for randperm")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(int(float(args.child[0])), args.child[1])))
        return
    print(f"batch size {BATCH}; times in ms; peak: resident MiB added (fresh process each)")
    print("| n | order | first batch | resume at 90% | peak MiB |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for n in (1e6, 1e7, 1e8, 3e8, 1e9):
        for permutation in ("feistel", "randperm"):
            if permutation == "randperm" and n > args.max_old:
                print(f"| {n:.0e} | randperm | (skipped: > --max-old) | | |")
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), permutation],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {n:.0e} | {permutation} | {r['first_ms']:.2f} | {r['resume_ms']:.2f} "
                f"| {r['peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
