"""Doctest collection, and what every test and doctest starts from.

Skip modules that need a framework which is not installed: the integrations are optional
extras; the framework scripts under tests/scripts/ are run as subprocesses by
tests/test_integrations_*.py and hold no doctests.
"""

from __future__ import annotations

import importlib.util

import pytest

import torchrepro.core._runinfo

collect_ignore = ["tests/scripts/lightning_resume.py", "tests/scripts/hf_resume.py"] + [
    f"torchrepro/integrations/{module}.py"
    for module in ("lightning", "transformers")
    if importlib.util.find_spec(module) is None
]


@pytest.fixture(autouse=True)
def _no_notes_from_earlier_tests() -> None:
    """Notes of earlier tests' loaders (the last batch, num_workers) must not reach a trace.

    Here rather than in tests/conftest.py so that doctests, which run in the same process
    in path order, start clean too.
    """
    torchrepro.core._runinfo.clear()
