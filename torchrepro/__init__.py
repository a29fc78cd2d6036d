"""torchrepro: bitwise-reproducible PyTorch training, and the tools that prove it.

Layers (each imports only from those above it in this list):
core (``_seed``, ``_rng``, ``_determinism``, ``_envdiff``, ``_dist``, ``_envvars``, ``_errors``),
environment probe (``_fingerprint``), data (``data/``) and checkpointing (``_checkpoint``),
verification (``_checksum``, ``_trace``, ``_compare``, ``_audit``, ``_check``), the CLI (``_cli``).
"""

from ._audit import AuditReport, audit
from ._checkpoint import Checkpointer, Stateful, load_checkpoint, save_checkpoint
from ._checksum import tensor_checksum
from ._compare import Comparison, TraceData, compare_traces, read_trace
from ._determinism import DeterminismSettings, deterministic
from ._envdiff import Difference, diff_fingerprints
from ._errors import (
    CheckpointError,
    DeterminismError,
    RNGStateError,
    TorchreproError,
    TorchreproWarning,
    TraceError,
)
from ._fingerprint import fingerprint
from ._rng import get_rng_state, isolated_rng, set_rng_state
from ._seed import derive_seed, seed_everything
from ._trace import Trace
from ._version import __version__
from .data import DataLoader, sample_seed

__all__ = [
    "AuditReport",
    "CheckpointError",
    "Checkpointer",
    "Comparison",
    "DataLoader",
    "DeterminismError",
    "DeterminismSettings",
    "Difference",
    "RNGStateError",
    "Stateful",
    "TorchreproError",
    "TorchreproWarning",
    "Trace",
    "TraceData",
    "TraceError",
    "__version__",
    "audit",
    "compare_traces",
    "derive_seed",
    "deterministic",
    "diff_fingerprints",
    "fingerprint",
    "get_rng_state",
    "isolated_rng",
    "load_checkpoint",
    "read_trace",
    "sample_seed",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "tensor_checksum",
]
