"""The loader's state dict: a plain, versioned dict that JSON and ``weights_only`` carry.

Map-style datasets::

    {"version": 1, "kind": "map", "seed": int, "epoch": int,
     "batches_received": int,   # batches of this epoch the caller received (per rank,
                                # which is the global batch count: the same on every rank)
     "samples_consumed": int,   # samples of the epoch's global order consumed
     "dataset_length": int, "batch_size": int | None, "drop_last": bool,
     "shuffle": bool, "world_size": int,
     "order": "torchrepro" | "sampler",  # optional; missing means "torchrepro"
     "stream": "created:<k>" | "generator:<seed>",  # optional; missing means "created:0"
     "permutation": "feistel" | "randperm"}  # optional; missing means "randperm"

With ``"order": "sampler"`` (a user's sampler or batch sampler) the position is
``batches_received`` only (``samples_consumed`` repeats it: the sampler is replayed on
resume, so no sample count is needed), and the world size cannot change.

Iterable datasets (num_workers=0 and a stateful dataset only)::

    {"version": 1, "kind": "iterable", "seed": int, "epoch": int,
     "items_received": int, "dataset_state": <the dataset's own state_dict()>,
     "stream": str}  # optional, as above

``"permutation"`` versions torchrepro's own order (``_sampler.py``): a state saved before
the Feistel order existed has none, and the loader that loads it goes on with ``randperm``
(for every later epoch too), so an old run resumes exactly; new loaders use ``"feistel"``.

``"stream"`` is the loader's stream key (see ``_streams.py``); a state saved before keys
existed has none and resumes the stream ``"created:0"``, which is the one it was drawn from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core._seed import SEED_MAX
from ..core._statedict import check_versioned
from ._sampler import FEISTEL, RANDPERM, Order
from ._streams import DEFAULT, check_key

STATE_VERSION = 1
MAP_KEYS = (
    "version",
    "kind",
    "seed",
    "epoch",
    "batches_received",
    "samples_consumed",
    "dataset_length",
    "batch_size",
    "drop_last",
    "shuffle",
    "world_size",
)
OPTIONAL_KEYS = {"map": ("order", "stream", "permutation"), "iterable": ("stream",)}
ITERABLE_KEYS = ("version", "kind", "seed", "epoch", "items_received", "dataset_state")


def _type_name(value: object) -> str:
    return type(value).__name__


def check_int(state: Mapping[str, Any], key: str, low: int = 0, high: int | None = None) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"loader state {key!r} must be an int, got {_type_name(value)} {value!r}")
    if value < low or (high is not None and value > high):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"loader state {key!r} must be {expected}, got {value}")
    return value


def check_bool(state: Mapping[str, Any], key: str) -> bool:
    value = state[key]
    if not isinstance(value, bool):
        raise TypeError(f"loader state {key!r} must be a bool, got {_type_name(value)} {value!r}")
    return value


def validate(state: object, kind: str) -> Mapping[str, Any]:
    """Check the version, kind, keys and types shared by both kinds; return the mapping."""
    state = check_versioned(
        state, what="loader", version=STATE_VERSION, made_by="torchrepro.DataLoader.state_dict()"
    )
    got_kind = state.get("kind")
    if got_kind != kind:
        raise ValueError(
            f"loader state 'kind' must be {kind!r} for this loader's dataset, got {got_kind!r}"
        )
    keys = MAP_KEYS if kind == "map" else ITERABLE_KEYS
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"loader state is missing key(s) {missing}")
    unknown = sorted(set(state) - set(keys) - set(OPTIONAL_KEYS[kind]))
    if unknown:
        raise ValueError(f"loader state has unknown key(s) {unknown}")
    check_int(state, "seed", high=SEED_MAX)
    check_int(state, "epoch", high=SEED_MAX)
    check_key(state.get("stream", DEFAULT))
    return state


def stream_of(state: Mapping[str, Any]) -> str:
    return str(state.get("stream", DEFAULT))


def check_same(key: str, saved: object, here: object) -> None:
    if saved != here or type(saved) is not type(here):
        raise ValueError(
            f"loader state was made for {key}={saved!r}, but this loader has {key}={here!r}; "
            f"build the loader with the same {key} to resume"
        )


def _fields(
    *,
    seed: int,
    stream: str,
    epoch: int,
    batches: int,
    samples: int,
    length: int,
    batch_size: int | None,
    drop_last: bool,
    shuffle: bool,
    world_size: int,
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "kind": "map",
        "seed": seed,
        "epoch": epoch,
        "batches_received": batches,
        "samples_consumed": samples,
        "dataset_length": length,
        "batch_size": batch_size,
        "drop_last": drop_last,
        "shuffle": shuffle,
        "world_size": world_size,
        "stream": stream,
    }


def map_state(
    *, seed: int, stream: str, epoch: int, batches: int, order: Order, batch_size: int | None
) -> dict[str, Any]:
    """The state for torchrepro's own order."""
    fields = _fields(
        seed=seed,
        stream=stream,
        epoch=epoch,
        batches=batches,
        samples=order.samples_consumed(batches),
        length=order.length,
        batch_size=batch_size,
        drop_last=order.drop_last,
        shuffle=order.shuffle,
        world_size=order.world_size,
    )
    return {**fields, "permutation": order.algorithm}


def sampler_state(
    *,
    seed: int,
    stream: str,
    epoch: int,
    batches: int,
    samples: int,
    length: int,
    batch_size: int | None,
    drop_last: bool,
    world_size: int,
) -> dict[str, Any]:
    """The state for a user's sampler: batches received, replayed on resume
    (``samples_consumed`` repeats ``batches``: see the module docstring)."""
    fields = _fields(
        seed=seed,
        stream=stream,
        epoch=epoch,
        batches=batches,
        samples=samples,
        length=length,
        batch_size=batch_size,
        drop_last=drop_last,
        shuffle=False,
        world_size=world_size,
    )
    return {**fields, "order": "sampler"}


def load_sampler(
    state: object,
    *,
    seed: int,
    length: int,
    batch_size: int | None,
    drop_last: bool,
    world_size: int,
) -> tuple[str, int, int]:
    """Validate a user-sampler state; return ``(stream, epoch, batches_received)``."""
    state = validate(state, "map")
    _check_order(state, "sampler")
    check_same("seed", check_int(state, "seed", high=SEED_MAX), seed)
    check_same("dataset_length", check_int(state, "dataset_length"), length)
    check_same("batch_size", state["batch_size"], batch_size)
    check_same("drop_last", check_bool(state, "drop_last"), drop_last)
    world = check_int(state, "world_size", low=1)
    if world != world_size:
        raise ValueError(
            f"loader state was made with world_size={world} and a sampler of your own, but "
            f"this loader runs with world_size={world_size}: a sampler's stream is per rank, "
            "so its position cannot be carried to another world size (strict=False does not "
            "help); resume with the same world size, or let torchrepro order the samples "
            "(shuffle=True/False, no sampler=) to change it"
        )
    epoch = check_int(state, "epoch", high=SEED_MAX)
    return stream_of(state), epoch, check_int(state, "batches_received")


def _check_order(state: Mapping[str, Any], expected: str) -> None:
    found = state.get("order", "torchrepro")
    if found != expected:
        raise ValueError(
            f"loader state 'order' is {found!r}, but this loader's order is {expected!r}: "
            "build the loader with the same sampler=/batch_sampler= (or none) to resume"
        )


def load_map(
    state: object, *, seed: int, order: Order, batch_size: int | None, strict: bool
) -> tuple[str, str, int, int]:
    """Validate a map-style state against the loader; return
    ``(stream, permutation, epoch, batches_received)``."""
    state = validate(state, "map")
    _check_order(state, "torchrepro")
    permutation = state.get("permutation", RANDPERM)
    if permutation not in (FEISTEL, RANDPERM):
        raise ValueError(
            f"loader state 'permutation' must be {FEISTEL!r} or {RANDPERM!r}, got "
            f"{permutation!r}: was it made by a newer torchrepro?"
        )
    check_same("seed", check_int(state, "seed", high=SEED_MAX), seed)
    check_same("dataset_length", check_int(state, "dataset_length"), order.length)
    saved_batch = state["batch_size"]
    if saved_batch is not None:
        check_int(state, "batch_size", low=1)
    check_same("drop_last", check_bool(state, "drop_last"), order.drop_last)
    check_same("shuffle", check_bool(state, "shuffle"), order.shuffle)
    epoch = check_int(state, "epoch", high=SEED_MAX)
    world = check_int(state, "world_size", low=1)
    if world == order.world_size:
        # Another per-rank batch is fine only together with another world size: the
        # global batch (kept constant by e.g. batch_size = global // world) decides.
        check_same("batch_size", saved_batch, batch_size)
    consumed = check_int(state, "samples_consumed", high=order.length)
    per_epoch = order.batches_per_epoch()
    if world != order.world_size:
        if strict:
            raise ValueError(
                f"loader state was made with world_size={world}, but this loader runs with "
                f"world_size={order.world_size}; pass strict=False to continue from its "
                f"sample position ({consumed} samples of epoch {epoch} consumed)"
            )
        # Round down: samples may be seen twice across the change, never skipped.
        batches = consumed // order.global_batch
        if (saved_batch is None) != (batch_size is None):
            check_same("batch_size", saved_batch, batch_size)
    else:
        batches = check_int(state, "batches_received", high=per_epoch)
        expected = order.samples_consumed(batches)
        if consumed != expected:
            raise ValueError(
                f"loader state 'samples_consumed' must be {expected} for "
                f"batches_received={batches}, got {consumed}"
            )
    if per_epoch and batches >= per_epoch:
        return stream_of(state), permutation, epoch + 1, 0
    return stream_of(state), permutation, epoch, batches


def iterable_state(
    *, seed: int, stream: str, epoch: int, items: int, dataset: Any
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "kind": "iterable",
        "seed": seed,
        "epoch": epoch,
        "items_received": items,
        "dataset_state": dataset.state_dict(),
        "stream": stream,
    }


def load_iterable(state: object, *, seed: int) -> tuple[str, int, int, Any]:
    """Validate an iterable state; return ``(stream, epoch, items, dataset_state)``."""
    state = validate(state, "iterable")
    check_same("seed", check_int(state, "seed", high=SEED_MAX), seed)
    epoch = check_int(state, "epoch", high=SEED_MAX)
    items = check_int(state, "items_received")
    return stream_of(state), epoch, items, state["dataset_state"]
