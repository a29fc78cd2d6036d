"""Find RNG objects held by a dataset, which per-sample seeding cannot reach."""

from __future__ import annotations

import random
import sys
import types
from typing import Any

import torch

_MAX_DEPTH = 5  # dataset.transform.transforms[2].rng is 4 levels down
_MAX_OBJECTS = 5000  # objects visited at most
_MAX_ITEMS = 64  # items of one list/tuple/dict looked at
_SKIP = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Tensor, range)
_OPAQUE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _rng_types() -> tuple[type, ...]:
    kinds: list[type] = [random.Random, torch.Generator]
    np = sys.modules.get("numpy")
    if np is not None:
        kinds += [np.random.Generator, np.random.RandomState, np.random.BitGenerator]
    return tuple(kinds)


def _global_rngs() -> set[int]:
    """The module-level generators per-sample seeding does reach."""
    found = {id(random._inst), id(torch.default_generator)}  # type: ignore[attr-defined]
    np = sys.modules.get("numpy")
    if np is not None:
        rand = np.random.mtrand._rand
        found |= {id(rand), id(rand._bit_generator)}
    return found


def _children(obj: Any) -> list[tuple[str, Any, bool]]:
    """``(path suffix, child, counts as a level)`` for the attributes and items of ``obj``."""
    if isinstance(obj, dict):
        return [(f"[{key!r}]", value, True) for key, value in list(obj.items())[:_MAX_ITEMS]]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", value, True) for i, value in enumerate(obj[:_MAX_ITEMS])]
    out: list[tuple[str, Any, bool]] = []
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        for name, value in list(attrs.items())[:_MAX_ITEMS]:
            if name == "_modules" and isinstance(value, dict):
                # nn.Module children (torchvision transforms): spell them as attributes.
                out += [(f".{key}", child, True) for key, child in value.items()]
            elif not name.startswith("__"):
                out.append((f".{name}", value, True))
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if isinstance(name, str) and not name.startswith("__") and hasattr(obj, name):
                out.append((f".{name}", getattr(obj, name), True))
    return out


def find_rngs(dataset: Any, root: str = "dataset") -> list[str]:
    """Paths like ``dataset.transform.transforms[2].rng (random.Random)`` of RNG objects.

    Walks attributes, ``__slots__``, lists, tuples and dicts a few levels deep, with
    cycle protection and caps on the objects visited. The global generators that
    per-sample seeding reseeds (``random``'s, NumPy's and torch's) are not reported.
    """
    kinds = _rng_types()
    skip_ids = _global_rngs()
    seen: set[int] = set()
    found: list[str] = []
    stack: list[tuple[Any, str, int]] = [(dataset, root, 0)]
    while stack and len(seen) < _MAX_OBJECTS:
        obj, path, depth = stack.pop()
        if id(obj) in seen or isinstance(obj, (*_SKIP, *_OPAQUE)):
            continue
        seen.add(id(obj))
        if isinstance(obj, kinds):
            if id(obj) not in skip_ids and not isinstance(obj, random.SystemRandom):
                found.append(f"{path} ({type(obj).__module__}.{type(obj).__qualname__})")
            continue
        if depth >= _MAX_DEPTH or (
            type(obj).__module__ in ("numpy", "builtins")
            and not isinstance(obj, (dict, list, tuple))
        ):
            continue
        try:
            children = _children(obj)
        except Exception:  # a property or container that refuses to be inspected
            continue
        for suffix, child, level in reversed(children):
            stack.append((child, path + suffix, depth + level))
    return sorted(found)
