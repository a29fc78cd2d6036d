"""Doctest collection: skip modules that need a framework which is not installed.

The integrations are optional extras; the framework scripts under tests/scripts/ are run as
subprocesses by tests/test_integrations_*.py and hold no doctests.
"""

from __future__ import annotations

import importlib.util

collect_ignore = ["tests/scripts/lightning_resume.py", "tests/scripts/hf_resume.py"] + [
    f"torchrepro/integrations/{module}.py"
    for module in ("lightning", "transformers")
    if importlib.util.find_spec(module) is None
]
