from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_does_not_add_numpy_beyond_torch():
    # torch may import NumPy itself; torchrepro must not add it (nor anything optional).
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import torchrepro\n"
        "added = set(sys.modules) - before\n"
        "print(','.join(sorted(m for m in added if m.split('.')[0] in "
        "('numpy', 'torchvision', 'sklearn', 'hypothesis', 'lightning', 'pytorch_lightning', "
        "'torchdata', 'transformers', 'accelerate', 'torchrepro.integrations'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_pulls_no_optional_package():
    code = (
        "import sys, torchrepro\n"
        "heavy = [m for m in ('numpy', 'torchvision', 'sklearn', 'hypothesis', 'lightning', 'matplotlib', "
        "'transformers', 'accelerate', 'torchrepro.integrations') if sys.modules.get(m) is not None]\n"
        "print(','.join(heavy))"
    )
    # torch itself may import numpy when it is installed; block it to see torchrepro's own imports.
    blocker = "import sys; sys.modules['numpy'] = None\n"
    out = subprocess.run(
        [sys.executable, "-c", blocker + code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_works_without_numpy():
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import random, torch, torchrepro\n"
        "torchrepro.seed_everything(3); a = random.random()\n"
        "s = torchrepro.get_rng_state(); assert s['numpy'] is None\n"
        "torchrepro.seed_everything(3); assert random.random() == a\n"
        "torchrepro.set_rng_state(s)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PYTHONHASHSEED": "0", "PATH": ""}
    )


PACKAGE = Path(__file__).resolve().parent.parent / "torchrepro"
CORE = {
    "_seed",
    "_rng",
    "_determinism",
    "_envdiff",
    "_errors",
    "_envvars",
    "_dist",
    "_teardown",
    "_statedict",
    "_runinfo",
    "_version",
}
VERIFICATION = {
    "_checksum",
    "_tracefile",
    "_trace",
    "_compare",
    "_audit",
    "_process",
    "_check",
    "_localize",
    "_explain",
    "_report",
}
# The optional framework integrations (integrations/) sit on top: nothing else imports them.
TOP = {"_cli", "integrations"}
# What each layer must not import (the layers above it).
FORBIDDEN = {
    **{
        name: {"data", "_checkpoint", "_ckptfile", "_fingerprint", *TOP, *VERIFICATION}
        for name in CORE
    },
    "_fingerprint": {"data", "_checkpoint", "_ckptfile", *TOP, *VERIFICATION},
    "_checkpoint": {"data", *TOP, *VERIFICATION},
    "_ckptfile": {"data", "_checkpoint", "_fingerprint", *TOP, *VERIFICATION},
    **{
        f"data/{p.stem}": {"_checkpoint", "_ckptfile", *TOP, *VERIFICATION}
        for p in (PACKAGE / "data").glob("*.py")
    },
    **dict.fromkeys(VERIFICATION, TOP),
    "_cli": {"integrations"},
    "__init__": {"integrations"},
}
INTEGRATIONS = sorted(p.stem for p in (PACKAGE / "integrations").glob("*.py"))
# Framework modules each integration may import; the rest of torchrepro imports none of them.
FRAMEWORKS = {"lightning", "pytorch_lightning", "transformers", "accelerate", "datasets"}


def _imported_modules(path: Path) -> set[str]:
    """Top-level torchrepro modules a file imports, whatever the import's form."""
    inside_data = path.parent.name == "data"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "torchrepro" and len(parts) > 1:
                    found.add(parts[1])
                elif parts[0] == "torchrepro":
                    found.update(alias.name for alias in node.names)
                continue
            base_is_package = (node.level == 1 and not inside_data) or (
                node.level == 2 and inside_data
            )
            if not base_is_package:  # a sibling inside data/
                found.add("data")
                continue
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "torchrepro" and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_layers_import_only_downward(module):
    path = PACKAGE / f"{module}.py"
    bad = _imported_modules(path) & FORBIDDEN[module]
    assert not bad, f"{module}.py imports {sorted(bad)} from a layer above it"


def _frameworks_imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add((node.module or "").split(".")[0])
    return found & FRAMEWORKS


# Each integration module and the frameworks it may import.
INTEGRATION_FRAMEWORKS = {
    "__init__": set(),
    "_common": set(),
    "lightning": {"lightning"},
    "transformers": {"transformers", "datasets"},
}


@pytest.mark.parametrize("module", INTEGRATIONS)
def test_each_integration_imports_only_its_framework(module):
    assert module in INTEGRATION_FRAMEWORKS, f"integrations/{module}.py is new: list it here"
    found = _frameworks_imported(PACKAGE / "integrations" / f"{module}.py")
    assert found <= INTEGRATION_FRAMEWORKS[module], (
        f"integrations/{module}.py imports {sorted(found)}"
    )


def test_no_module_outside_integrations_imports_a_framework():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "integrations":
            continue
        bad = _frameworks_imported(path)
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}; only integrations/ may"


def test_layer_check_sees_every_import_form(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("from . import _cli\nfrom ._trace import Trace\nimport torchrepro._audit\n")
    assert _imported_modules(sample) >= {"_cli", "_trace", "_audit"}


def test_only_the_cli_prints():
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("_cli.py", "__main__.py"):
            continue
        calls = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        ]
        assert not calls, f"{path.name} prints"
