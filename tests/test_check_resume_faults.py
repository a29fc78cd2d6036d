"""A resume fault is named as such, with its cause (issue 23, rules 5 and 9).

End to end through the CLI, on tests/scripts/resume_faults.py: each fault makes the resumed
run part from the uninterrupted one while runs 1 and 2 agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).parent / "scripts" / "resume_faults.py")

pytestmark = pytest.mark.slow


def _check(fault: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESUME_FAULT": fault}
    env.pop("TORCHREPRO_SEED", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrepro",
            "check",
            "--resume-at",
            "5",
            "--",
            sys.executable,
            SCRIPT,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("fault", "step", "cause"),
    [
        (
            "scheduler",
            7,  # step 6 runs with the restored lr; the restarted schedule sets step 7's
            "the LR scheduler LambdaLR of the saved optimizer 'optimizer' is not saved",
        ),
        (
            "accumulation",
            6,  # step 6 ends the accumulation whose first half was lost
            "the save at step 5 came in the middle of gradient accumulation",
        ),
    ],
)
def test_a_resume_fault_is_named_with_its_cause(
    tmp_path: Path, fault: str, step: int, cause: str
) -> None:
    proc = _check(fault, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(
        f"RESUME FAULT: the resumed run differs from the uninterrupted one from step {step} "
        '(run "resume at 5" vs "run 1")'
    ), first
    assert cause in first
    # The pinpoint re-ran each configuration as itself: both repeated their first runs.
    assert "nondetermin" not in proc.stdout
    assert "did not repeat" not in proc.stdout


def test_a_correct_resume_is_reproducible(tmp_path: Path) -> None:
    proc = _check("", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("REPRODUCIBLE: 3 runs x 12 steps bitwise identical")
