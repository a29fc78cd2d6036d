"""Seed derivation and :func:`seed_everything`.

Every random stream torchrepro creates is keyed by ``derive_seed(seed, *path)``: a
BLAKE2b hash (Python's ``hashlib``, so no NumPy needed) of the user's seed and a
path of purposes and positions, e.g. ``(seed, "sample", epoch, index)``. The encoding
is unambiguous (each part is tagged and length-fixed), so distinct paths give
independent 64-bit seeds and every bit of the user's seed matters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import secrets
import sys
import warnings

import torch

from .._errors import TorchreproWarning
from . import _dist, _envvars, _runinfo
from ._rng import _numpy

__all__ = ["SEED_MAX", "derive_seed", "seed_everything", "validate_seed"]

SEED_MAX = 2**64 - 1
_PERSON = b"torchrepro.v1"  # BLAKE2b personalisation: bump only with a documented stream change
_MASK64 = 2**64 - 1

log = logging.getLogger("torchrepro")

_hash_seed_warned = False


def validate_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` if it is an int in ``[0, 2**64 - 1]``.

    Raises:
        TypeError: ``seed`` is not an int (a bool is refused too).
        ValueError: ``seed`` is out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"{name} must be an int in [0, 2**64 - 1], got {type(seed).__name__} {seed!r}"
        )
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be an int in [0, 2**64 - 1], got {seed}")
    return seed


def _encode(path: tuple[int | str, ...]) -> bytes:
    parts = []
    for item in path:
        if isinstance(item, str):
            raw = item.encode()
            parts.append(b"s" + len(raw).to_bytes(4, "little") + raw)
        else:
            parts.append(b"i" + (item & _MASK64).to_bytes(8, "little"))
    return b"".join(parts)


def derive_words(seed: int, *path: int | str, words: int = 1) -> tuple[int, ...]:
    """``words`` independent 64-bit values for ``(seed, *path)``, from one BLAKE2b call."""
    digest = hashlib.blake2b(_encode((seed, *path)), digest_size=8 * words, person=_PERSON).digest()
    return tuple(int.from_bytes(digest[8 * k : 8 * k + 8], "little") for k in range(words))


def derive_seed(seed: int, *path: int | str) -> int:
    """Derive an independent 64-bit seed for a purpose and position from ``seed``.

    A pure function: the same arguments give the same seed on every machine, Python
    and torch version. Ints in ``path`` are taken modulo 2**64.

    Args:
        seed: the run's seed, an int in ``[0, 2**64 - 1]``.
        *path: purposes and positions, e.g. ``"shuffle", epoch``.

    Returns:
        An int in ``[0, 2**64 - 1]``.

    Raises:
        TypeError, ValueError: ``seed`` is not a valid seed, a path item is not int/str, or
            a string cannot be encoded as UTF-8 (a lone surrogate).

    >>> derive_seed(0, "shuffle", 1) == derive_seed(0, "shuffle", 1)
    True
    >>> derive_seed(0, "shuffle", 1) != derive_seed(0, "shuffle", 2)
    True
    """
    validate_seed(seed)
    for item in path:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"derive_seed path items must be int or str, got {item!r}")
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"derive_seed path items must be encodable as UTF-8, got {item!r} "
                    f"({exc.reason} at position {exc.start}); pass valid text, e.g. "
                    "s.encode('utf-8', 'surrogatepass').hex()"
                ) from None
    return derive_words(seed, *path)[0]


def seed_from_env() -> int | None:
    """``TORCHREPRO_SEED`` as a valid seed, or None when unset.

    Raises:
        ValueError: naming the variable, when it is not an int in ``[0, 2**64 - 1]``.
    """
    return _envvars.env_int(_envvars.SEED, low=0, high=SEED_MAX)


def _warn_if_hash_seed_random() -> None:
    global _hash_seed_warned
    if _hash_seed_warned:
        return
    fixed = sys.flags.hash_randomization == 0 or os.environ.get("PYTHONHASHSEED", "").isdigit()
    # A launcher's other ranks (torchrun, accelerate launch, Lightning's DDP) share rank 0's
    # environment: rank 0 says it once for the job, not once per process.
    other_rank = os.environ.get("RANK", "0") not in ("", "0")
    if fixed or other_rank:
        return
    _hash_seed_warned = True
    warnings.warn(
        "PYTHONHASHSEED was not fixed when Python started, so the iteration order of sets "
        "(and of dicts built from them) of str/bytes differs between runs; data built that way "
        "can be reordered. Launch with `torchrepro run -- python ...` or export PYTHONHASHSEED=0.",
        TorchreproWarning,
        stacklevel=3,
    )


def _seed_numpy(value: int) -> None:
    np = _numpy()  # optional, and imported only when seeding
    if np is None:
        return
    # Two 32-bit words: the legacy MT19937 seeding keeps all 64 bits this way.
    np.random.seed([value & 0xFFFFFFFF, value >> 32])


def _draw_seed() -> int:
    """A seed from OS entropy, the same on every rank of a distributed job.

    Every rank draws; rank 0's draw is shared through the process group's store (no
    device, bounded wait), so all ranks shuffle and initialise alike. Launched with
    ``WORLD_SIZE`` > 1 but no process group yet, the ranks cannot agree: refuse rather than
    let each rank train on its own order.
    """
    if _dist.is_distributed() and _dist.world_size() > 1:
        decision, _values = _dist.agree(str(secrets.randbits(32)).encode(), lambda v: v[0])
        return int(decision)
    launched = os.environ.get("WORLD_SIZE", "").strip()
    if launched.isdigit() and int(launched) > 1:
        raise ValueError(
            f"seed_everything() has no seed: none was given, {_envvars.SEED} is unset, and this "
            f"process is one of WORLD_SIZE={launched} ranks with no process group yet, so each "
            f"rank would draw its own seed and train on its own data order. Set {_envvars.SEED} "
            f"for the launcher (e.g. `{_envvars.SEED}=0 torchrun ...`), pass seed=, or call "
            "seed_everything() after torch.distributed.init_process_group() (then every rank "
            "uses rank 0's drawn seed)"
        )
    return secrets.randbits(32)


def seed_everything(seed: int | None = None, *, per_rank: bool = False) -> int:
    """Seed Python ``random``, NumPy's global RNG, torch CPU and every CUDA/MPS/XPU device.

    The three libraries get different streams, each derived from ``seed`` with
    :func:`derive_seed`, so ``random.random()`` and ``np.random.random()`` do not repeat
    each other, and seeds that differ in any bit (``0`` and ``2**32``) give different draws.

    Side effects: seeds the global RNGs above; sets ``TORCHREPRO_SEED`` in ``os.environ``
    so that child processes and :class:`torchrepro.DataLoader` use the same seed; warns
    once (:class:`TorchreproWarning`) when ``PYTHONHASHSEED`` was not fixed at start.

    Args:
        seed: an int in ``[0, 2**64 - 1]``. ``None`` reads ``TORCHREPRO_SEED``; if that is
            unset, a seed is drawn from OS entropy and logged at WARNING level
            (the ``torchrepro`` logger: printed to stderr unless logging is configured).
            Under torch.distributed every rank gets rank 0's draw (call it on every rank).
        per_rank: mix the torch.distributed global rank (or ``RANK``) into the streams,
            so each rank draws differently (dropout). The default keeps every rank's
            streams identical, so model initialisation agrees across ranks.

    Returns:
        The seed used (not the derived ones).

    Raises:
        TypeError, ValueError: ``seed`` or ``TORCHREPRO_SEED`` is not a valid seed, or
            ``per_rank`` is not a bool; no seed under a launcher (``WORLD_SIZE`` > 1)
            before the process group exists.

    >>> import random
    >>> seed_everything(7)
    7
    >>> a = random.random(); _ = seed_everything(7); a == random.random()
    True
    """
    if not isinstance(per_rank, bool):
        raise TypeError(
            f"per_rank must be True or False, got {type(per_rank).__name__} {per_rank!r}"
        )
    _warn_if_hash_seed_random()
    if seed is None:
        seed = seed_from_env()
        if seed is None:
            seed = _draw_seed()
            # WARNING, not INFO: shown on stderr without any logging set up, since a run
            # cannot be repeated without it.
            log.warning(
                "torchrepro: no seed given; drew seed %d (set TORCHREPRO_SEED=%d to repeat)",
                seed,
                seed,
            )
    validate_seed(seed)
    os.environ[_envvars.SEED] = str(seed)
    path: tuple[int | str, ...] = ("rank", _dist.rank()) if per_rank else ()
    seed_streams(seed, "global", *path)
    _runinfo.note("seed", seed)  # for the trace header
    return seed


def seed_streams(seed: int, *path: int | str) -> None:
    """Seed Python, NumPy and torch (every device) with three words derived from ``(seed, *path)``."""
    py_seed, np_seed, torch_seed = derive_words(seed, *path, words=3)
    random.seed(py_seed)
    _seed_numpy(np_seed)
    torch.manual_seed(torch_seed)  # also seeds every CUDA, MPS and XPU device
