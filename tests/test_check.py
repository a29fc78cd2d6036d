"""`torchrepro check` end to end, on a tiny script run in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).parent / "scripts" / "tiny_train.py")
CLI = [sys.executable, "-m", "torchrepro", "check"]

# End-to-end: starts training processes (minutes in all); -m 'not slow' skips it.
pytestmark = pytest.mark.slow


def _check(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TORCHREPRO_SEED", None)
    return subprocess.run(
        [*CLI, *args, "--", sys.executable, SCRIPT],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_clean_script_with_varied_workers_and_resume_is_reproducible(tmp_path):
    proc = _check(
        ["--vary", "num_workers=0,2", "--resume-at", "11", "--keep", str(tmp_path / "keep")],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REPRODUCIBLE: 4 runs x 16 steps bitwise identical" in proc.stdout
    runs = sorted(p.name for p in (tmp_path / "keep").iterdir())
    assert runs == ["run1", "run2", "run3", "run4"]
    assert (tmp_path / "keep" / "run4" / "checkpoint.pt").exists()
    assert "run 4/4" in proc.stderr  # progress


def test_a_difference_at_step_7_is_pinpointed_between_state_records(tmp_path):
    """The state is recorded at steps 1 and 10; check re-runs 2..10 and names step 7."""
    proc = _check(["--json", "--vary", "TINY_NUDGE=0,1"], tmp_path, env={"TINY_NUDGE_STEP": "7"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    comparison = report["comparisons"][1]
    assert (comparison["first_step"], comparison["earliest_step"], comparison["exact"]) == (
        7,
        7,
        True,
    )
    # exact, on any CPU: the script nudges 3.weight after step 7's update, before its record
    assert [(e["kind"], e["name"]) for e in comparison["entries"]] == [("param", "3.weight")]
    assert report["verdict"] == 'DIVERGED at step 7 (run "TINY_NUDGE=1" vs "run 1")'
    assert (
        "with the model's state recorded every step: the first divergent step is 7"
        in (report["pinpoint_note"])
    )


def test_a_nondeterministic_difference_stays_bounded_and_says_why(tmp_path):
    """The marker makes every later run nudge: the re-runs cannot repeat the first runs."""
    proc = _check(
        [], tmp_path, env={"TINY_NUDGE_MARKER": str(tmp_path / "marker"), "TINY_NUDGE_STEP": "7"}
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("DIVERGED at a step in 2-")
    assert first.endswith('(run "run 2" vs "run 1") with identical settings')
    assert 'the re-run of "run 1" did not repeat its first run' in proc.stdout
    assert "not localized: the first divergent step is not known exactly" in proc.stdout


def test_crashing_command_exits_2_with_its_stderr(tmp_path):
    proc = _check([], tmp_path, env={"TINY_CRASH": "1"})
    assert proc.returncode == 2
    assert "exited with status 1" in proc.stdout
    assert "tiny_train crashed on purpose" in proc.stdout


def test_command_without_trace_is_an_error(tmp_path):
    proc = _check([], tmp_path, env={"TINY_NO_TRACE": "1"})
    assert proc.returncode == 2
    assert "recorded no trace: add `trace = torchrepro.Trace()`" in proc.stdout


def test_resume_without_checkpointer_is_an_error(tmp_path):
    proc = _check(["--resume-at", "3"], tmp_path, env={"TINY_NO_CHECKPOINT": "1"})
    assert proc.returncode == 2
    assert "wrote no checkpoint" in proc.stdout


def test_resume_step_beyond_the_run_is_an_error(tmp_path):
    proc = _check(["--resume-at", "999"], tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert 'run "run 1" ran 16 steps' in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vary", "num_workers"], "--vary must look like NAME=V1,V2"),
        (["--runs", "0"], "must be an integer in [2, 100], got '0': only two runs"),
        (["--resume-at", "x"], "must be an integer >= 1"),
    ],
)
def test_usage_errors(tmp_path, args, message):
    proc = _check(args, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_missing_command_is_usage_error():
    proc = subprocess.run([*CLI, "--runs", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing the command to run" in proc.stderr
