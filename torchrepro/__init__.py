"""torchrepro: bitwise-reproducible PyTorch training, and the tools that prove it."""

from ._checkpoint import Checkpointer, Stateful, load_checkpoint, save_checkpoint
from ._determinism import DeterminismSettings, deterministic
from ._envdiff import Difference, diff_fingerprints
from ._errors import (
    CheckpointError,
    DeterminismError,
    RNGStateError,
    TorchreproError,
    TorchreproWarning,
)
from ._fingerprint import fingerprint
from ._rng import get_rng_state, isolated_rng, set_rng_state
from ._seed import derive_seed, seed_everything
from ._version import __version__

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "DeterminismError",
    "DeterminismSettings",
    "Difference",
    "RNGStateError",
    "Stateful",
    "TorchreproError",
    "TorchreproWarning",
    "__version__",
    "derive_seed",
    "deterministic",
    "diff_fingerprints",
    "fingerprint",
    "get_rng_state",
    "isolated_rng",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
