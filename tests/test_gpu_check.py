"""benchmarks/gpu_check.sh runs in CI without a GPU: the CUDA parts skip, nothing fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="bash")
def test_gpu_check_cpu_mode_skips_the_gpu_parts(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_LOGS": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("gpu_check: device: cpu")
    summary = [line for line in lines if line.startswith("gpu_check: ")][1:]
    assert len(summary) == 4, lines  # one line per part, then the total
    tests, example, gpu, total = summary
    assert " PASS " in tests and "skipped" in tests  # CUDA tests collected and skipped
    assert " SKIP " in example and " SKIP " in gpu
    assert total.startswith("gpu_check: 3 parts, 0 failed")
    assert (tmp_path / "cuda_tests.log").exists()


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: bash benchmarks/gpu_check.sh [--cpu]" in proc.stderr
