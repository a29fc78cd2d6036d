"""Which stream a loader draws: its key, and the seed its order and samples derive from.

Every torchrepro loader in a process is its own stream, for the order and for the
per-sample randomness alike. The key is a string:

- ``"generator:<s>"`` when the loader is given ``generator=g``: ``s = g.initial_seed()``.
  Two loaders given generators of the same seed share a stream (the way to ask for it);
- ``"created:<k>"`` otherwise: the ``k``-th loader of the process keyed this way (0, 1,
  ...), so a script that builds its loaders in the same order gets the same streams;
- a loader built from another's ``sampler``/``batch_sampler`` (Lightning's re-creation,
  torch's ``DistributedSampler`` wrapped around it) inherits that loader's key and takes
  no creation number.

``"created:0"`` is the stream of torchrepro before keys existed (its streams derive from the
seed itself), which a state dict without a key resumes; any other key ``k`` derives its
streams from ``derive_seed(seed, "loader-stream", k)``. ``state_dict()`` carries the key and
``load_state_dict()`` restores it, so a resumed loader continues its own stream whatever
order the script builds its loaders in.
"""

from __future__ import annotations

import itertools
import re
import threading
from typing import Any

import torch

from .._seed import derive_seed

DEFAULT = "created:0"
_KEY = re.compile(r"(created|generator):(0|[1-9][0-9]{0,19})")

_lock = threading.Lock()
_created = itertools.count()


def next_created() -> str:
    """The key of the next loader keyed by creation order in this process."""
    with _lock:
        return f"created:{next(_created)}"


def reset_created() -> None:
    """Start creation order at 0 again (each test of the suite runs as a fresh process would)."""
    global _created
    with _lock:
        _created = itertools.count()


def key_for(generator: Any) -> str:
    """The key of a loader given ``generator`` (or None) and no loader to inherit from."""
    if generator is None:
        return next_created()
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__} "
            f"{generator!r:.80}"
        )
    return f"generator:{generator.initial_seed()}"


def check_key(key: object, what: str = "loader state 'stream'") -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(
            f"{what} must be a string 'created:<k>' or 'generator:<seed>', got {key!r}"
        )
    return key


def stream_seed(seed: int, key: str) -> int:
    """The seed every stream of a loader with ``key`` derives from."""
    return seed if key == DEFAULT else derive_seed(seed, "loader-stream", key)
