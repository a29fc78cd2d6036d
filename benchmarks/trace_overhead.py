"""Training-step time with ``torchrepro.Trace`` recording every step vs disabled.

Both variants run in one process on the same model, in interleaved blocks (the order
alternates), and the medians of the blocks' per-step times are compared. Models: the
example's CNN on 8x8 digit-sized inputs (batch 64) and a ~5M-parameter MLP (batch 256),
on CPU. Goal: at most 3% overhead.

    python benchmarks/trace_overhead.py            # about a minute
    python benchmarks/trace_overhead.py --quick    # a few seconds, noisier
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from torchrepro._trace import Trace


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 4 * 4, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 1536), nn.ReLU(), nn.Linear(1536, 10)
    )


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[Trace], float]:
    """One training step; returns the seconds spent inside ``trace.step``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(trace: Trace) -> float:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        start = time.perf_counter()
        trace.step(loss=loss, model=model)
        return time.perf_counter() - start

    return step


def measure(
    step: Callable[[Trace], float], path: str, blocks: int, per_block: int
) -> tuple[float, float, float]:
    """Median per-step seconds over interleaved blocks: (traced, disabled, inside Trace.step)."""
    traced, disabled = Trace(path), Trace(None)
    for _ in range(3):  # warm up both paths (allocator, weight tables, file)
        step(traced)
        step(disabled)
    times: dict[str, list[float]] = {"traced": [], "disabled": [], "inside": []}
    for b in range(blocks):
        order = [("traced", traced), ("disabled", disabled)]
        for name, trace in order if b % 2 == 0 else order[::-1]:
            inside = 0.0
            start = time.perf_counter()
            for _ in range(per_block):
                inside += step(trace)
            times[name].append((time.perf_counter() - start) / per_block)
            if name == "traced":
                times["inside"].append(inside / per_block)
    return tuple(statistics.median(times[k]) for k in ("traced", "disabled", "inside"))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (a few seconds; noisier)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.pop("TORCHREPRO_TRACE", None)  # the disabled variant must be disabled
    torch.manual_seed(0)
    cases = [
        (
            "CNN, 8x8 inputs, batch 64",
            cnn(),
            torch.randn(64, 1, 8, 8),
            torch.randint(0, 10, (64,)),
            20,
            30,
        ),
        (
            "MLP ~5M params, batch 256",
            mlp(),
            torch.randn(256, 784),
            torch.randint(0, 10, (256,)),
            4,
            12,
        ),
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; Trace(every=1) vs disabled"
    )
    print(
        "overhead = traced/disabled - 1 (interleaved medians); in-trace = time inside Trace.step / disabled"
    )
    header = f"{'model':28} {'params':>9} {'disabled ms':>12} {'traced ms':>10} {'overhead':>9} {'in-trace':>9} {'bytes/step':>11}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model, x, y, default_per_block, default_blocks) in enumerate(cases):
            blocks = 4 if args.quick else default_blocks
            per_block = max(default_per_block // 2, 2) if args.quick else default_per_block
            model.train()
            path = os.path.join(tmp, f"trace{i}.jsonl")
            traced, disabled, inside = measure(make_step(model, x, y), path, blocks, per_block)
            with open(path) as f:
                lines = f.readlines()[1:]
            size = sum(len(line) for line in lines) / len(lines)
            params = sum(p.numel() for p in model.parameters())
            overhead = 100 * (traced / disabled - 1)
            share = 100 * inside / disabled
            print(
                f"{name:28} {params:>9,} {disabled * 1e3:>12.3f} {traced * 1e3:>10.3f} "
                f"{overhead:>8.2f}% {share:>8.2f}% {size:>11.0f}"
            )


if __name__ == "__main__":
    main()
