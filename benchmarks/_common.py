"""Helpers shared by the benchmark scripts: the machine line, timing, markdown tables."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence


def version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line(extra: dict[str, str | None]) -> str:
    """One line: UTC date, CPU model and cores, Python, torch, and the ``extra`` versions."""
    import torch

    parts = [
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        f"{cpu_model()}, {os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
    ]
    parts += [f"{name} {v if v is not None else 'not installed'}" for name, v in extra.items()]
    return ", ".join(parts)


def interleaved(
    measures: dict[str, Callable[[], float]], repeats: int, warmup: int = 0
) -> dict[str, float]:
    """Median of each measure's results, run in ABBA order (so drift hits all alike)."""
    names = list(measures)
    for _ in range(warmup):
        for name in names:
            measures[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            results[name].append(measures[name]())
    return {name: statistics.median(values) for name, values in results.items()}


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A measure: seconds per call of ``fn``, averaged over a block of ``calls`` calls."""

    def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls

    return measure


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; ``|`` inside cells is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` as ``1.23x``."""
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a"
