"""Doctest collection of torchrepro/: skip the integrations whose framework is not installed."""

from __future__ import annotations

import importlib.util

collect_ignore = [
    f"torchrepro/integrations/{module}.py"
    for module, framework in (("lightning", "lightning"), ("transformers", "transformers"))
    if importlib.util.find_spec(framework) is None
]
