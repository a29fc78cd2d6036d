"""Argument checks and the environment variables the loader reads."""

from __future__ import annotations

import logging
import numbers
from typing import Any

from ..core import _envvars
from ..core._seed import seed_from_env, validate_seed

log = logging.getLogger("torchrepro")

MAX_WORKERS = 1024  # TORCHREPRO_NUM_WORKERS above this is a typo, not a machine
EPOCH_MAX = 2**64 - 1  # epochs are hashed as 8 bytes


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(name: str, value: object, *, low: int, allow_none: bool = False) -> None:
    """The type only: torch refuses values out of range with its own messages."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        none = " or None" if allow_none else ""
        raise TypeError(
            f"{name} must be an int >= {low}{none}, got {_type_name(value)} {value!r}; "
            f"pass e.g. {name}={max(low, 1)}"
        )


def check_bool(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")


def check_epoch(epoch: object, name: str = "epoch") -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(
            f"{name} must be an int in [0, 2**64 - 1], got {_type_name(epoch)} {epoch!r}"
        )
    if not 0 <= epoch <= EPOCH_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**64 - 1], got {epoch}")
    return epoch


def check_dataset(dataset: object) -> None:
    if dataset is None or not (hasattr(dataset, "__getitem__") or hasattr(dataset, "__iter__")):
        raise TypeError(
            "dataset must be a map-style dataset (with __getitem__ and __len__) or an "
            f"IterableDataset, got {_type_name(dataset)} {dataset!r:.80}"
        )


def check_arguments(
    *,
    dataset: object,
    batch_size: object,
    shuffle: object,
    num_workers: object,
    drop_last: object,
    timeout: object,
    prefetch_factor: object,
    persistent_workers: object,
    pin_memory: object,
    in_order: object,
    with_sampler: bool,
) -> None:
    """Type checks at the public boundary. torch checks the ranges and the combinations
    (``shuffle`` or ``drop_last`` given with a sampler, or with an IterableDataset, get
    torch's own ValueError)."""
    check_dataset(dataset)
    check_int("batch_size", batch_size, low=1, allow_none=True)
    check_int("num_workers", num_workers, low=0)
    check_int("prefetch_factor", prefetch_factor, low=0, allow_none=True)
    if not with_sampler:
        check_bool("shuffle", shuffle, allow_none=True)
        check_bool("drop_last", drop_last)
    for name, value in (
        ("persistent_workers", persistent_workers),
        ("pin_memory", pin_memory),
        ("in_order", in_order),
    ):
        check_bool(name, value)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number >= 0, got {_type_name(timeout)} {timeout!r}")


def resolve_seed(seed: int | None) -> int:
    if seed is None:
        seed = seed_from_env()
        if seed is None:
            raise ValueError(
                "torchrepro.DataLoader needs a seed: pass seed=<int>, or call "
                f"torchrepro.seed_everything(seed) first (it sets {_envvars.SEED})"
            )
    return validate_seed(seed)


def forced_workers() -> int | None:
    """``TORCHREPRO_NUM_WORKERS`` as an int in [0, MAX_WORKERS], or None when unset."""
    forced = _envvars.env_int(_envvars.NUM_WORKERS, low=0, high=MAX_WORKERS)
    if forced is not None:
        log.info("torchrepro: %s=%d replaces num_workers", _envvars.NUM_WORKERS, forced)
    return forced


def drop_worker_only(name: str, value: Any, default: Any) -> Any:
    """With num_workers forced to 0, the arguments torch refuses then are dropped (logged)."""
    if value not in (None, False, 0, default):
        log.info("torchrepro: num_workers is 0, so %s=%r is dropped", name, value)
    return default
