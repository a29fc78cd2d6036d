"""``torchrepro check`` on compiled training scripts, end to end (slow: every run compiles).

The runs share one Inductor cache in a temporary directory, cold for the first run; check
gives its second run a cold cache of its own. Skipped without a C++ compiler, which
Inductor needs on CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_digits_compiled.py"
PLANTED = REPO / "tests" / "scripts" / "planted_compiled.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None,
        reason="Inductor compiles CPU kernels with a C++ compiler; none on PATH",
    ),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inductor-cache")


def _check(args: list[str], script: list[str], cwd: Path, cache: Path, **env: str) -> str:
    full_env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), **env}
    full_env.pop("TORCHREPRO_SEED", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torchrepro", "check", *args, "--", sys.executable, *script],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def test_compiled_example_is_reproducible_across_workers_resume_and_a_cold_cache(
    tmp_path, cache_dir
):
    keep = tmp_path / "keep"
    script = [str(EXAMPLE), "--limit", "640", "--epochs", "1"]  # 10 steps
    out = _check(
        ["--vary", "num_workers=0,2", "--resume-at", "6", "--keep", str(keep)],
        script,
        tmp_path,
        cache_dir,
    )
    assert out.startswith("exit 0"), out
    assert "REPRODUCIBLE: 4 runs x 10 steps bitwise identical" in out
    cold = keep / "run2" / "inductor-cache"
    assert cold.is_dir() and any(cold.rglob("*")), "run 2 did not compile into its own cache"
    assert not (keep / "run1" / "inductor-cache").exists()


def test_planted_divergence_in_a_compiled_model_is_localized_by_module_name(tmp_path, cache_dir):
    out = _check(["--localize"], [str(PLANTED)], tmp_path, cache_dir, PLANT="module")
    assert out.startswith("exit 1"), out
    assert "DIVERGED at step 1" in out
    assert "param 1.weight" in out and "_orig_mod" not in out
    assert "first difference in `3` (UnseededNoise) forward output" in out
