"""Helpers shared by the framework integration tests: run a script or ``torchrepro check``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "scripts"
EXAMPLES = REPO / "examples"


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TORCHREPRO_")}
    return {**clean, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO)}


def run_json(script: str, cwd: Path) -> Any:
    """Run ``tests/scripts/<script>`` and parse the JSON it prints."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=cwd,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(*args: str, command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrepro check ARGS -- COMMAND`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "torchrepro", "check", *args, "--", *command],
        capture_output=True,
        text=True,
        env=env(),
        cwd=cwd,
        timeout=900,
    )


def torchrun(script: str, *args: str) -> list[str]:
    """A 2-process CPU torchrun of ``examples/<script>`` (gloo)."""
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    return [launcher, "--standalone", "--nproc-per-node", "2", str(EXAMPLES / script), *args]
