"""Argument checks and the environment variables the loader reads."""

from __future__ import annotations

import logging
from typing import Any

from .. import _envvars
from .._seed import seed_from_env, validate_seed

log = logging.getLogger("torchrepro")

_REFUSED = {
    "sampler": "the sample order must be torchrepro's own, so that it is a function of "
    "(seed, epoch) and can be resumed; use shuffle=True/False",
    "batch_sampler": "the sample order must be torchrepro's own, so that it is a function of "
    "(seed, epoch) and can be resumed; use batch_size and drop_last",
    "generator": "torchrepro owns the loader's generators, derived from seed=",
}
# Arguments torch refuses with num_workers=0; dropped when TORCHREPRO_NUM_WORKERS sets 0.
_WORKER_ONLY = ("persistent_workers", "prefetch_factor", "multiprocessing_context", "timeout")


def resolve_seed(seed: int | None) -> int:
    if seed is None:
        seed = seed_from_env()
        if seed is None:
            raise ValueError(
                "torchrepro.DataLoader needs a seed: pass seed=<int>, or call "
                f"torchrepro.seed_everything(seed) first (it sets {_envvars.SEED})"
            )
    return validate_seed(seed)


def resolve_workers(kwargs: dict[str, Any]) -> None:
    forced = _envvars.env_int(_envvars.NUM_WORKERS, low=0)
    if forced is None:
        return
    log.info("torchrepro: %s=%d replaces num_workers", _envvars.NUM_WORKERS, forced)
    kwargs["num_workers"] = forced
    if forced == 0:
        for name in _WORKER_ONLY:
            if kwargs.get(name) not in (None, False, 0):
                log.info("torchrepro: num_workers is 0, so %s=%r is dropped", name, kwargs[name])
            kwargs.pop(name, None)


def check_arguments(shuffle: object, kwargs: dict[str, Any]) -> None:
    """Refuse the arguments that would break the invariant; pops ``in_order``."""
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"torchrepro.DataLoader does not accept {name}=: {why}")
    if kwargs.pop("in_order", True) is not True:
        raise ValueError(
            "torchrepro.DataLoader does not accept in_order=False: batches delivered "
            "out of order depend on worker timing, so runs would differ"
        )
    if shuffle is not None and not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__} {shuffle!r}")
