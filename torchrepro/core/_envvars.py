"""The environment variables torchrepro reads, and their strict parsing.

Names live here so that the library, the CLI and the docs agree on them.
"""

from __future__ import annotations

import os

SEED = "TORCHREPRO_SEED"
NUM_WORKERS = "TORCHREPRO_NUM_WORKERS"
CHECKPOINT = "TORCHREPRO_CHECKPOINT"
STOP_AT = "TORCHREPRO_STOP_AT"
TRACE = "TORCHREPRO_TRACE"
TRACE_ALL_RANKS = "TORCHREPRO_TRACE_ALL_RANKS"
TRACE_STATE_EVERY = "TORCHREPRO_TRACE_STATE_EVERY"
DIST_TIMEOUT = "TORCHREPRO_DIST_TIMEOUT"
# Localization (torchrepro check): capture one step per module; keep every checkpoint.
LOCALIZE_STEP = "TORCHREPRO_LOCALIZE_STEP"
KEEP_CHECKPOINTS = "TORCHREPRO_KEEP_CHECKPOINTS"
# torchrepro check: where a Checkpointer writes the state of its objects at process exit.
EXIT_STATE = "TORCHREPRO_EXIT_STATE"


def env_int(name: str, *, low: int, high: int | None = None) -> int | None:
    """Read environment variable ``name`` as an int in ``[low, high]``; None when unset or empty.

    Raises:
        ValueError: naming the variable, the accepted range and the value found.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    upper = "" if high is None else f", {high}"
    expected = f"an integer in [{low}{upper}]" if high is not None else f"an integer >= {low}"
    try:
        value = int(raw, 10)
    except ValueError:
        raise ValueError(f"environment variable {name} must be {expected}, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"environment variable {name} must be {expected}, got {raw!r}")
    return value


def env_path(name: str) -> str | None:
    """Read environment variable ``name`` as a path; None when unset or empty."""
    raw = os.environ.get(name, "")
    return raw or None
