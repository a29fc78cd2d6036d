"""`torchrepro check` verifies what each run really did (real subprocesses, a tiny script).

Each case passed, or was reported backwards, before runs recorded their own facts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_check import _check  # the same runner as the other check tests


@pytest.mark.parametrize(
    ("knob", "message"),
    [
        (
            "TINY_NO_RESUME",
            r"the resumed process did not resume, not from step 5; call Checkpointer.resume\(\)",
        ),
        ("TINY_TRACE_NOT_SAVED", r"the resumed process continued with step 1, not step 6"),
    ],
)
def test_a_resume_that_did_not_resume_fails(tmp_path: Path, knob: str, message: str) -> None:
    proc = _check(["--resume-at", "5"], tmp_path, env={knob: "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "REPRODUCIBLE" not in proc.stdout
    import re

    assert re.search(message, proc.stdout), proc.stdout


def test_a_vary_without_effect_fails(tmp_path: Path) -> None:
    proc = _check(["--vary", "num_workers=0,2"], tmp_path, env={"TINY_TORCH_LOADER": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "--vary num_workers=2 had no effect: no torchrepro.DataLoader read "
        "TORCHREPRO_NUM_WORKERS; is the loader torch's own?"
    ) in proc.stdout


@pytest.mark.parametrize(
    ("env", "code", "verdict"),
    [
        (
            {},
            0,
            "REPRODUCIBLE: 2 runs x 16 steps bitwise identical (every step's loss and batch; "
            "the model's state at 2 of them and after the last); seed=2 differs, as another "
            "seed must",
        ),
        ({"TINY_FIXED_SEED": "1"}, 1, "the seed has no effect"),
    ],
)
def test_another_seed_must_differ(
    tmp_path: Path, env: dict[str, str], code: int, verdict: str
) -> None:
    proc = _check(["--vary", "seed=1,2"], tmp_path, env=env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert verdict in proc.stdout


def test_runs_with_identical_settings_that_differ_are_named_first(tmp_path: Path) -> None:
    proc = _check([], tmp_path, env={"TINY_UNSEEDED": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith("DIVERGED at step 1 (run ")
    assert first.endswith("with identical settings")
    assert "before torchrepro.seed_everything()" in second
    assert "torchrepro.audit" in second


def test_resume_at_past_run_1_is_refused_before_more_runs(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    proc = _check(["--resume-at", "16", "--keep", str(keep)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert '--resume-at 16: run "run 1" ran 16 steps' in proc.stdout
    assert sorted(p.name for p in keep.iterdir()) == ["run1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "1"], "--runs: must be an integer in [2, 100], got '1'"),
        (["--runs", "1", "--vary", "seed=1,2"], "only two runs of one identical configuration"),
        (["--runs", "1", "--resume-at", "3"], "use --runs 2 (the default)"),
        (["--vary", "TORCHREPRO_STOP_AT=3,4"], "TORCHREPRO_STOP_AT is set by --resume-at K"),
        (["--vary", "TORCHREPRO_TRACE=a,b"], "TORCHREPRO_TRACE is set by the checker"),
    ],
)
def test_checks_that_prove_nothing_are_refused(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = _check(args, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "tiny.pt").exists()
