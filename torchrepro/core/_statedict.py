"""The checks every versioned state dict shares (RNG state, loader state, trace state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_versioned(
    state: object, *, what: str, version: int, made_by: str, error: type[Exception] = ValueError
) -> Mapping[str, Any]:
    """Return ``state`` if it is a mapping with ``state["version"] == version``.

    Raises:
        TypeError: ``state`` is not a mapping.
        error: the version differs (the message names what, expected and found).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict from {made_by}, got {type(state).__name__}")
    found = state.get("version")
    if found != version:
        raise error(
            f"{what} state 'version' must be {version}, got {found!r}: was it made by {made_by}?"
        )
    return state
