"""What each run leaves behind, compared at exit: its objects' state and its tensor files.

A trace holds what the script showed it; a run can still end otherwise (a final untraced
update, a best-weights restore, an EMA copy the trace never saw). Two things are compared
after every run:

- the state of every object the script's Checkpointer holds, and the RNGs, as the run
  exits (the Checkpointer writes them to ``TORCHREPRO_EXIT_STATE``);
- the tensor files the run wrote in its working directory (``.pt``, ``.pth``,
  ``.safetensors``, ``.npy``, ``.npz`` modified while it ran), tensor by tensor.

Runs of one check run one after another, so each run's files are checksummed right after
it ends, before the next run overwrites them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..trace._checksum import tensor_checksums

__all__ = ["EXIT_STATE", "SUFFIXES", "exit_differences", "file_differences", "tensor_files"]

EXIT_STATE = "exit_state.pt"
SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz")
# At most this many files are read per run (a directory of thousands is not a result).
MAX_FILES = 64
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages"}


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts, lists and tuples, with its path, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from leaves(value[key], f"{path}[{key!r}]" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def _fingerprints(value: Any, directory: Path) -> dict[str, str]:
    """Each leaf as a comparable string: tensors and arrays by exact checksum."""
    found = dict(leaves(value))
    tensors = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    sums = tensor_checksums([t.detach().cpu() for t in tensors.values()])
    out = {}
    for key, item in found.items():
        if key in tensors:
            t = tensors[key]
            out[key] = f"tensor {t.dtype} {tuple(t.shape)} {sums.pop(0):016x}"
        elif type(item).__module__ == "numpy" and hasattr(item, "tobytes"):
            digest = hashlib.blake2b(item.tobytes(), digest_size=8).hexdigest()
            out[key] = f"array {item.dtype} {getattr(item, 'shape', ())} {digest}"
        else:
            out[key] = repr(item).replace(str(directory), "<run>")  # each run's own paths
    return out


def _is_tensor(text: str) -> bool:
    return text.startswith(("tensor ", "array "))


def _describe(a: dict[str, str], b: dict[str, str], prefix: str) -> list[str]:
    values, tensors = [], []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if (x and _is_tensor(x)) or (y and _is_tensor(y)):
            tensors.append(f"{prefix}{key}")
        else:
            values.append(f"{prefix}{key}: {x or '(absent)'} vs {y or '(absent)'}")
    if tensors:
        values.append(
            f"tensor {tensors[0]}" + (f" and {len(tensors) - 1} more" if len(tensors) > 1 else "")
        )
    return values


def exit_state(directory: Path) -> dict[str, str] | None:
    """The exit state a run's Checkpointer wrote, as leaf fingerprints; None when none."""
    path = directory / EXIT_STATE
    if not path.exists():
        return None
    try:  # written by the run for this check, in the check's own run directory
        content = torch.load(path, map_location="cpu", weights_only=False)
        state = {**content["objects"], "RNG": content["rng"]}
    except Exception:
        return None
    return _fingerprints(state, directory)


def exit_differences(reference: Path, other: Path) -> tuple[list[str], list[str]]:
    """What was compared at exit (object names) and what differs, first differences first.

    Nothing is compared when either run wrote no exit state.
    """
    a, b = exit_state(reference), exit_state(other)
    if a is None or b is None:
        return [], []
    names = sorted({k.split("[", 1)[0] for k in a} - {"RNG"})
    return [*names, "RNG"], _describe(a, b, "")


def _load(path: Path) -> Any:
    if path.suffix in (".pt", ".pth"):
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only to read such a file

        return load_file(str(path))
    import numpy  # optional: only to read .npy/.npz files

    if path.suffix == ".npy":
        return numpy.load(path, allow_pickle=False)
    with numpy.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def tensor_files(directory: Path, since: float, *, skip: Path) -> dict[str, dict[str, str]]:
    """The tensor files under ``directory`` modified at or after ``since``, by relative
    path, each as leaf fingerprints (``{"": "unreadable: ..."}`` when it cannot be read).
    ``skip``: a directory not to look into (the check's own run directories)."""
    found: dict[str, dict[str, str]] = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d not in SKIP_DIRS
            and Path(root, d).resolve() != skip.resolve()
        )
        for name in sorted(files):
            path = Path(root, name)
            if path.suffix not in SUFFIXES or len(found) >= MAX_FILES:
                continue
            try:
                if path.stat().st_mtime < since:
                    continue
                value = _load(path)
            except Exception as exc:
                found[str(path.relative_to(directory))] = {"": f"unreadable: {type(exc).__name__}"}
                continue
            found[str(path.relative_to(directory))] = _fingerprints(value, directory)
    return found


def file_differences(
    reference: dict[str, dict[str, str]], other: dict[str, dict[str, str]]
) -> list[str]:
    """Per file: written by one run only, or the tensors and values that differ."""
    out = []
    for name in sorted(reference.keys() | other.keys()):
        if name not in other or name not in reference:
            out.append(f"{name}: written by one run only")
        else:
            out += _describe(reference[name], other[name], f"{name}: ")
    return out
