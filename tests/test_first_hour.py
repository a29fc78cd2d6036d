"""What a new user meets in the first hour: a drawn seed they can see, and a CI script that
leaves their environment alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_drawn_seed_is_shown_on_stderr_without_logging_setup() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHREPRO_SEED"}
    proc = subprocess.run(
        [sys.executable, "-c", "import torchrepro; print(torchrepro.seed_everything())"],
        env={**env, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    seed = int(proc.stdout)
    assert f"drew seed {seed} (set TORCHREPRO_SEED={seed} to repeat)" in proc.stderr


def test_given_seed_prints_nothing(run_python) -> None:
    proc = run_python("import torchrepro; torchrepro.seed_everything(3)")
    assert "seed" not in proc.stderr


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout"
)
def test_ci_leaves_the_users_venv_alone(tmp_path: Path) -> None:
    """.ci/run works in a clone of HEAD elsewhere; the README's line it runs creates .venv."""
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    shutil.copy(REPO / ".ci" / "run", clone / ".ci" / "run")  # this version, committed or not
    marker = clone / ".venv" / "mine"
    marker.parent.mkdir()
    marker.write_text("the user's environment")
    proc = subprocess.run(
        ["bash", str(clone / ".ci" / "run")],
        env={**os.environ, "CI_DRY_RUN": "1", "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CI: python3 -m venv .venv && .venv/bin/pip install -e '.[test]'" in proc.stdout
    assert marker.read_text() == "the user's environment"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # its temp clone is gone
