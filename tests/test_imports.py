from __future__ import annotations

import ast
import os
import re
import shutil
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
        "'transformers', 'accelerate', 'torchrepro.integrations', 'torch._dynamo', "
        "'torch._inductor') if sys.modules.get(m) is not None]\n"
        "print(','.join(heavy))"
    )
    # torch itself may import numpy when it is installed; block it to see torchrepro's own imports.
    # Dynamo and Inductor cost seconds to import: torchrepro reads them only once torch has.
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
ROOT = PACKAGE.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
LAYERS = ("core", "env", "data", "checkpoint", "trace", "check", "integrations")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's contracts (pyproject.toml) over the package in ``root``."""
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def test_every_layer_imports_only_from_the_layers_below_it():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("core/_seed.py", "from ..trace import _checksum"),  # core reaches up to trace
        ("data/_loader.py", "from ..checkpoint import _io"),  # data and checkpoint are siblings
        ("trace/_trace.py", "from ..check import _verdict"),  # trace reaches up to check
        ("check/_runner.py", "from ..integrations import _common"),
        ("env/_diff.py", "import lightning"),  # a framework outside integrations
    ],
)
def test_the_layer_contract_fails_on_an_upward_import(tmp_path, module, line):
    # The contract must be able to fail: plant one bad import in a copy of the package.
    shutil.copytree(PACKAGE, tmp_path / "torchrepro", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "torchrepro" / module
    text = target.read_text()
    cut = text.index("\nfrom ") + 1  # among the module's own imports
    target.write_text(text[:cut] + line + "\n" + text[cut:])
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    importer = "torchrepro." + module.removesuffix(".py").replace("/", ".")
    assert importer in result.stdout, result.stdout


def test_every_subpackage_is_a_layer_of_the_contract():
    # A new subpackage must be placed in the contract, or nothing holds its imports.
    config = (ROOT / "pyproject.toml").read_text()
    layers = config[config.index("layers = [") : config.index("]", config.index("layers = ["))]
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert found == set(LAYERS)
    for name in found:
        assert re.search(rf"torchrepro\.{name}\b", layers), f"{name} is in no layer"


def test_the_package_root_only_re_exports():
    # __init__ imports the public names, never the CLI or an integration.
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None
            assert not node.module.startswith(("_cli", "integrations")), node.module
        else:
            assert isinstance(node, (ast.Expr, ast.Assign)), ast.dump(node)


INTEGRATIONS = sorted(p.stem for p in (PACKAGE / "integrations").glob("*.py"))
# Framework modules each integration may import; the rest of torchrepro imports none of them.
FRAMEWORKS = {"lightning", "pytorch_lightning", "transformers", "accelerate", "datasets"}


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
    "accelerate": {"accelerate"},
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
