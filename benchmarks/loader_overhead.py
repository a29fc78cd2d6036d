"""Overhead of torchrepro.DataLoader against torch's DataLoader, side by side in one process.

(a) 64x64 uint8 RGB images through torchvision v2 RandomResizedCrop + flip + ColorJitter,
    2 workers: throughput ratio (goal: at most 2% lower).
(b) a dataset returning a scalar tensor, 0 workers: added microseconds per sample
    (goal: at most 10 us) at batch size 64, and at batch size 1 for reference (the
    main-process RNG save/restore is paid per batch).
(c) resuming at 90% of a 1,000,000-sample shuffled epoch: load_state_dict plus the time
    to the first batch, in milliseconds.

Repeats are interleaved in ABBA order and medians reported, of wall time and of CPU time
(this process plus its reaped workers; steadier than wall time on a shared machine).

    python benchmarks/loader_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from torchrepro.data import DataLoader as ReproLoader


class Images(Dataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        from torchvision.transforms import v2

        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=gen)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(56, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])  # type: ignore[no-any-return]


class Scalars(Dataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        self.values = list(torch.arange(n).unbind())

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.values[i]


class Indices(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _epoch_times(loader: Any) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process plus the workers it reaped) of an epoch."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in loader:
        pass
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return wall, time.process_time() - cpu + workers


def _interleaved(
    make: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) epoch seconds per loader, run in ABBA order after a warm-up."""
    loaders = {name: factory() for name, factory in make.items()}
    for loader in loaders.values():
        _epoch_times(loader)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    names = list(loaders)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(_epoch_times(loaders[name]))
    return {
        name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for name, values in times.items()
    }


def bench_images(n: int, repeats: int) -> None:
    dataset = Images(n)
    # Workers restart each epoch (torch and torchrepro alike), so their CPU time is counted.
    common: dict[str, Any] = {"batch_size": 64, "num_workers": 2}
    medians = _interleaved(
        {
            "torch": lambda: torch.utils.data.DataLoader(dataset, shuffle=True, **common),
            "torchrepro": lambda: ReproLoader(dataset, shuffle=True, seed=0, **common),
        },
        repeats,
    )
    (torch_wall, torch_cpu), (repro_wall, repro_cpu) = medians["torch"], medians["torchrepro"]
    ratio = torch_wall / repro_wall
    print(
        f"(a) images, 2 workers: torch {n / torch_wall:,.0f} samples/s, torchrepro "
        f"{n / repro_wall:,.0f} samples/s, throughput ratio {ratio:.3f} "
        f"({(1 - ratio) * 100:+.1f}% lower; goal <= 2%); CPU per sample "
        f"{torch_cpu / n * 1e6:.0f} vs {repro_cpu / n * 1e6:.0f} us "
        f"(ratio {repro_cpu / torch_cpu:.3f})"
    )


def bench_scalars(n: int, repeats: int, batch_size: int) -> None:
    dataset = Scalars(n)
    medians = _interleaved(
        {
            "torch": lambda: torch.utils.data.DataLoader(dataset, batch_size=batch_size),
            "torchrepro": lambda: ReproLoader(dataset, batch_size=batch_size, seed=0),
        },
        repeats,
    )
    (torch_wall, torch_cpu), (repro_wall, repro_cpu) = medians["torch"], medians["torchrepro"]
    print(
        f"(b) scalar tensors, 0 workers, batch {batch_size}: torch "
        f"{torch_wall / n * 1e6:.2f} us/sample, torchrepro {repro_wall / n * 1e6:.2f} us/sample, "
        f"added {(repro_wall - torch_wall) / n * 1e6:.2f} us/sample wall, "
        f"{(repro_cpu - torch_cpu) / n * 1e6:.2f} us/sample CPU"
        + (" (goal <= 10 us)" if batch_size > 1 else "")
    )


def bench_resume(n: int, repeats: int) -> None:
    batch = 64
    template = ReproLoader(Indices(n), batch_size=batch, shuffle=True, seed=0).state_dict()
    batches = int(0.9 * n) // batch
    template.update(batches_received=batches, samples_consumed=batches * batch)
    times = []
    for _ in range(repeats):
        loader = ReproLoader(Indices(n), batch_size=batch, shuffle=True, seed=0)
        start = time.perf_counter()
        loader.load_state_dict(template)
        next(iter(loader))
        times.append(time.perf_counter() - start)
    print(
        f"(c) resume at 90% of a {n:,}-sample epoch: {statistics.median(times) * 1e3:.1f} ms "
        "(load_state_dict + first batch)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_images(512 if args.quick else 2048, repeats)
    bench_scalars(20_000 if args.quick else 100_000, repeats, 64)
    bench_scalars(5_000 if args.quick else 20_000, repeats, 1)
    bench_resume(1_000_000, repeats)


if __name__ == "__main__":
    main()
