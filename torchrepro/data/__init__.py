"""Reproducible data loading: per-sample seeding, a resumable order, num_workers-invariant."""

from ._loader import DataLoader
from ._seeding import sample_seed

__all__ = ["DataLoader", "sample_seed"]
