"""torchrepro: bitwise-reproducible PyTorch training, and the tools that prove it."""

from ._errors import (
    CheckpointError,
    DeterminismError,
    RNGStateError,
    TorchreproError,
    TorchreproWarning,
)
from ._rng import get_rng_state, isolated_rng, set_rng_state
from ._seed import derive_seed, seed_everything
from ._version import __version__

__all__ = [
    "CheckpointError",
    "DeterminismError",
    "RNGStateError",
    "TorchreproError",
    "TorchreproWarning",
    "__version__",
    "derive_seed",
    "get_rng_state",
    "isolated_rng",
    "seed_everything",
    "set_rng_state",
]
