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

A loader built over a dataset that an earlier loader of the process already read (a loader
built anew each epoch, a ``train_one_epoch()`` that builds its own) starts its own stream
at epoch 0 instead of going on to the next epoch: it warns once per dataset, naming
``set_epoch``. A rebuild from another loader's samplers does not warn.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import warnings
import weakref
from typing import Any

import torch

from .._errors import TorchreproWarning
from ..core._seed import derive_seed

DEFAULT = "created:0"
_KEY = re.compile(r"(created|generator):(0|[1-9][0-9]{0,19})")

_lock = threading.Lock()
_created = itertools.count()


def next_created() -> str:
    """The key of the next loader keyed by creation order in this process."""
    with _lock:
        return f"created:{next(_created)}"


def reset_created() -> None:
    """Start creation order at 0 again and forget the datasets read (each test of the
    suite runs as a fresh process would)."""
    global _created
    with _lock:
        _created = itertools.count()
    _read.clear()
    _readers.clear()
    _warned.clear()


# Datasets a loader has read, by identity (weakly; a dataset that cannot be weakly
# referenced, such as a list, is found through the live loaders that read it), and those
# already warned about. By identity, never by the dataset's own __eq__/__hash__: a tensor
# used as a dataset compares elementwise, and a dataset may define equality by content.
_read: dict[int, weakref.ref[Any]] = {}
_readers: weakref.WeakSet[Any] = weakref.WeakSet()
_warned: set[int] = set()


def _forget(key: int) -> Any:
    """A weak reference's callback: drop ``key`` once its dataset is gone."""

    def forget(_ref: weakref.ref[Any]) -> None:
        _read.pop(key, None)

    return forget


def note_read(loader: Any) -> None:
    """``loader`` starts a pass over its dataset."""
    _readers.add(loader)
    dataset = loader.dataset
    key = id(dataset)
    with contextlib.suppress(TypeError):  # not weakly referable: found via _readers
        _read[key] = weakref.ref(dataset, _forget(key))


def warn_if_read(dataset: Any, key: str) -> None:
    """Warn when a loader not rebuilt from another is built over a dataset already read."""
    ref = _read.get(id(dataset))
    read = ref is not None and ref() is dataset
    read = read or any(loader.dataset is dataset for loader in list(_readers))
    if not read or id(dataset) in _warned:
        return
    _warned.add(id(dataset))
    warnings.warn(
        f"a new torchrepro.DataLoader reads a {type(dataset).__name__} that an earlier "
        f"loader of this process already read: it starts its own stream ({key!r}) at epoch "
        "0, not the earlier loader's next epoch, and a resumed run that builds a different "
        "number of loaders before it draws another stream. To go on epoch by epoch, build "
        "the loader once and call loader.set_epoch(epoch) before each epoch (and save its "
        "state_dict() to resume). (Warned once per dataset.)",
        TorchreproWarning,
        stacklevel=3,
    )


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
