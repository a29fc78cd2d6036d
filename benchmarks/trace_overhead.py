"""Training-step time with ``torchrepro.Trace`` recording every step vs disabled.

All variants run in one process on the same model, in interleaved blocks (ABBA: the
order reverses every block), and the medians of the blocks' per-step times are compared.
Models: the example's CNN on 8x8 digit-sized inputs (batch 64) and a ~5M-parameter MLP
(batch 256), on CPU. Goal: at most 3% overhead (1.03x).

Variants, side by side:
    off       Trace disabled (the baseline)
    v1        before: trace format 1's linear checksum, and norms on every step
    v2 norms  the non-linear checksum (format 2), norms on every step (norm_every=1)
    v2        the default: non-linear checksum on every step, norms every 10 steps

Then a profile of one traced MLP step: the checksums (v1 vs v2), the norms, and the rest.

    python benchmarks/trace_overhead.py            # a few minutes
    python benchmarks/trace_overhead.py --quick    # under a minute, noisier
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

from torchrepro import _checksum
from torchrepro._checksum import tensor_checksums, tensor_norms
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


def _linear(words: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Format 1's per-word term: the word times its key (the sum is the same otherwise)."""
    return words * keys


VARIANTS = ("off", "v1", "v2 norms", "v2")


def measure_variants(
    step: Callable[[Trace], float], tmp: str, blocks: int, per_block: int
) -> dict[str, list[float]]:
    """Per-step seconds of each block, per variant, run in ABBA order."""
    traces = {
        "off": Trace(None),
        "v1": Trace(os.path.join(tmp, "v1.jsonl"), norm_every=1),
        "v2 norms": Trace(os.path.join(tmp, "v2n.jsonl"), norm_every=1),
        "v2": Trace(os.path.join(tmp, "v2.jsonl")),
    }
    mixed = _checksum._mixed

    def block(name: str, steps: int) -> float:
        _checksum._mixed = _linear if name == "v1" else mixed  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            for _ in range(steps):
                step(traces[name])
            return (time.perf_counter() - start) / steps
        finally:
            _checksum._mixed = mixed

    for name in VARIANTS:  # warm up (allocator, key tables, files, the fingerprint)
        block(name, 3)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for b in range(blocks):
        for name in VARIANTS if b % 2 == 0 else VARIANTS[::-1]:
            times[name].append(block(name, per_block))
    return times


def profile(model: nn.Module, repeats: int) -> dict[str, float]:
    """Median milliseconds of the parts of one traced step, interleaved."""
    tensors = [*model.parameters(), *model.buffers()]
    mixed = _checksum._mixed

    def v1() -> None:
        _checksum._mixed = _linear  # type: ignore[assignment]
        try:
            tensor_checksums(tensors)
        finally:
            _checksum._mixed = mixed

    parts = {
        "checksums v1 (linear)": v1,
        "checksums v2 (non-linear)": lambda: tensor_checksums(tensors),
        "norms": lambda: tensor_norms(tensors),
    }
    results: dict[str, list[float]] = {name: [] for name in parts}
    names = list(parts)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            parts[name]()
            results[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in results.items()}


def _spread(values: list[float]) -> str:
    """The interquartile range of block times, relative to their median."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{100 * (q[2] - q[0]) / q[1]:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (under a minute; noisier)"
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
        ("CNN, 8x8 inputs, batch 64", cnn(), torch.randn(64, 1, 8, 8), 64, 20, 16),
        ("MLP ~5M params, batch 256", mlp(), torch.randn(256, 784), 256, 4, 16),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        "ms per training step, median of interleaved (ABBA) blocks; ratio = variant / off; "
        "spread = interquartile range of the off blocks / median"
    )
    cols = "".join(f"{name:>17}" for name in VARIANTS[1:])
    print(f"{'model':28} {'params':>9} {'off':>9}{cols} {'spread':>7}")
    mlp_model = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x, batch, default_per_block, default_blocks in cases:
            blocks = 6 if args.quick else default_blocks
            per_block = max(default_per_block // 2, 2) if args.quick else default_per_block
            model.train()
            y = torch.randint(0, 10, (batch,))
            times = measure_variants(make_step(model, x, y), tmp, blocks, per_block)
            med = {k: statistics.median(v) for k, v in times.items()}
            params = sum(p.numel() for p in model.parameters())
            cells = "".join(
                f"{med[k] * 1e3:.2f} ({med[k] / med['off']:.3f}x)".rjust(17) for k in VARIANTS[1:]
            )
            print(
                f"{name:28} {params:>9,} {med['off'] * 1e3:>9.2f}{cells} {_spread(times['off']):>7}"
            )
            mlp_model = model
    assert mlp_model is not None
    parts = profile(mlp_model, 10 if args.quick else 40)
    print("profile of one MLP step's trace (ms, median):")
    for part, ms in parts.items():
        print(f"  {part:28} {ms:8.3f}")


if __name__ == "__main__":
    main()
