"""Training-step time with ``torchrepro.Trace`` recording every step vs disabled.

All variants run in one process on the same model, in interleaved rounds: each round
runs one block of every variant (the order reverses every round: ABBA). A block is
``state_every`` (10) steps or a multiple, so each holds the same share of state records.
The ratio of a variant is the median over rounds of (its block / the same round's "off"
block); the spread is the interquartile range of those per-round ratios. Models: the
example's CNN on 8x8 digit-sized inputs (batch 64) and a ~5M-parameter MLP (batch 256),
on CPU. Goal: at most 3% overhead (1.03x) for the MLP.

Variants, side by side:
    off       Trace disabled (the baseline)
    v1        format 1 (before issue 10): linear checksum of the whole state every step,
              norms every step
    v2        format 2: non-linear checksum of the whole state every step, norms every
              10 steps (state_every=1)
    v3        the default (format 3): the loss and batch every step, the model's state
              every 10 steps (state_every=10), with the same non-linear checksum

Then a profile of one MLP step's trace parts: the state checksums (v1 vs v2/v3), the
norms.

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

from torchrepro.trace import _checksum
from torchrepro.trace._checksum import tensor_checksums, tensor_norms
from torchrepro.trace._trace import Trace


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


def _linear(
    words: torch.Tensor,
    keys: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Format 1's per-word term: the word times its key (the sum is the same otherwise)."""
    return torch.mul(words, keys, out=out) if out is not None else words * keys


VARIANTS = ("off", "v1", "v2", "v3")


def measure_variants(
    step: Callable[[Trace], float], tmp: str, blocks: int, per_block: int
) -> dict[str, list[float]]:
    """Per-step seconds of each block, per variant, run in ABBA order."""
    traces = {
        "off": Trace(None),
        "v1": Trace(os.path.join(tmp, "v1.jsonl"), norm_every=1, state_every=1),
        "v2": Trace(os.path.join(tmp, "v2.jsonl"), state_every=1),
        "v3": Trace(os.path.join(tmp, "v3.jsonl")),
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
        block(name, per_block)
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
        "state checksums v1 (linear)": v1,
        "state checksums v2/v3": lambda: tensor_checksums(tensors),
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


def _ratios(times: dict[str, list[float]], name: str) -> list[float]:
    """Per round: the variant's block time over the same round's "off" block time."""
    return [t / off for t, off in zip(times[name], times["off"], strict=True)]


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[2] - q[0]


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
    # (name, model, input, batch, steps per block, rounds): blocks hold whole state_every
    # periods, so every block of v3 has the same share of state records
    cases = [
        ("CNN, 8x8 inputs, batch 64", cnn(), torch.randn(64, 1, 8, 8), 64, 20, 16),
        ("MLP ~5M params, batch 256", mlp(), torch.randn(256, 784), 256, 10, 20),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(
        "ms per training step (median over rounds), and the ratio to off: the median over "
        "rounds of block / the round's off block, ± half the interquartile range of those ratios"
    )
    cols = "".join(f"{name:>24}" for name in VARIANTS[1:])
    print(f"{'model':28} {'params':>9} {'off':>8}{cols}")
    mlp_model = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x, batch, per_block, default_rounds in cases:
            rounds = 6 if args.quick else default_rounds
            model.train()
            y = torch.randint(0, 10, (batch,))
            times = measure_variants(make_step(model, x, y), tmp, rounds, per_block)
            med = {k: statistics.median(v) for k, v in times.items()}
            params = sum(p.numel() for p in model.parameters())
            cells = ""
            for k in VARIANTS[1:]:
                ratios = _ratios(times, k)
                cell = (
                    f"{med[k] * 1e3:.2f} ({statistics.median(ratios):.3f}x ±{_iqr(ratios) / 2:.3f})"
                )
                cells += cell.rjust(24)
            print(f"{name:28} {params:>9,} {med['off'] * 1e3:>8.2f}{cells}")
            mlp_model = model
    assert mlp_model is not None
    parts = profile(mlp_model, 10 if args.quick else 40)
    print("profile of one MLP step's trace parts (ms, median):")
    for part, ms in parts.items():
        print(f"  {part:28} {ms:8.3f}")


if __name__ == "__main__":
    main()
