"""torchrepro: bitwise-reproducible PyTorch training, and the tools that prove it.

The package is layered; each subpackage imports only from those below it (import-linter's
contract in ``pyproject.toml`` holds this in CI):

- ``core``: seeds, RNG state, the determinism switch, environment variables, distributed facts;
- ``env``: the environment fingerprint and its diff;
- ``data`` and ``checkpoint`` (independent of each other): the loader; save and resume;
- ``trace``: checksums, :class:`Trace`, the trace file, comparison, per-module capture, audit;
- ``check``: the ``torchrepro check`` runner, its stages and its verdict;
- ``_cli`` and ``integrations`` (optional framework extras that nothing below imports).

This module only re-exports the public names.
"""

from ._errors import (
    CheckpointError,
    DeterminismError,
    RNGStateError,
    TorchreproError,
    TorchreproWarning,
    TraceError,
)
from ._version import __version__
from .checkpoint._checkpointer import Checkpointer
from .checkpoint._io import Stateful, load_checkpoint, save_checkpoint
from .core._determinism import DeterminismSettings, deterministic
from .core._rng import get_rng_state, isolated_rng, set_rng_state
from .core._seed import derive_seed, seed_everything
from .data import DataLoader, sample_seed
from .env._diff import Difference, diff_fingerprints
from .env._fingerprint import fingerprint
from .trace._audit import AuditReport, audit
from .trace._checksum import tensor_checksum
from .trace._compare import Comparison, TraceData, compare_traces, read_trace
from .trace._trace import Trace

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
