"""The exception and warning classes of torchrepro.

Every error torchrepro raises on purpose is a :class:`TorchreproError` or a plain
``ValueError``/``TypeError`` raised at a public boundary for a bad argument.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DeterminismError",
    "RNGStateError",
    "TorchreproError",
    "TorchreproWarning",
    "TraceError",
]


class TorchreproError(RuntimeError):
    """Root of the errors torchrepro raises for a reproducibility problem."""


class DeterminismError(TorchreproError):
    """A determinism setting cannot take effect (e.g. CUDA was initialised too early)."""


class RNGStateError(TorchreproError):
    """An RNG state cannot be restored on this machine (other devices, other format)."""


class CheckpointError(TorchreproError):
    """A checkpoint file is missing, torn, corrupted, or does not match the objects."""


class TraceError(TorchreproError):
    """A trace file is missing, is not a torchrepro trace, or is corrupted."""


class TorchreproWarning(UserWarning):
    """A reproducibility hazard that does not stop the run."""
