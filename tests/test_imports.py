from __future__ import annotations

import subprocess
import sys


def test_import_pulls_no_optional_package():
    code = (
        "import sys, torchrepro\n"
        "heavy = [m for m in ('numpy', 'torchvision', 'sklearn', 'hypothesis', 'lightning') if sys.modules.get(m) is not None]\n"
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


def test_layers_import_only_downward():
    """core modules never import data, checkpoint, verification or CLI modules."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "torchrepro"
    core = {"_seed", "_rng", "_determinism", "_envdiff", "_errors", "_envvars", "_dist", "_version"}
    upper = (
        "data",
        "_checkpoint",
        "_trace",
        "_audit",
        "_compare",
        "_check",
        "_cli",
        "_fingerprint",
    )
    for name in core:
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                target = (node.module or "").split(".")[0]
                assert target not in upper, f"{name}.py imports {target}"
