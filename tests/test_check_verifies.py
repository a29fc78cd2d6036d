"""`torchrepro check` verifies what each run really did (real subprocesses, a tiny script).

Each case passed, or was reported backwards, before runs recorded their own facts.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
            "the model's state at 2 of them and after the last; at exit: the state of loader, "
            "model, optimizer, trace, RNG); seed=2 differs, as another seed must",
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
        (["--vary", "seed=1,01"], "gives one value twice ('1' and '01' are both seed=1)"),
        (["--vary", "num_workers=2,0,2"], "gives one value twice ('2' and '2'"),
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


SCRIPTS = Path(__file__).parent / "scripts"


def _check_script(
    script: str, args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TORCHREPRO_SEED", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrepro",
            "check",
            *args,
            "--",
            sys.executable,
            str(SCRIPTS / script),
        ],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_numpy_batch_is_compared_by_content(tmp_path: Path) -> None:
    # The ids differ, the losses and the model do not: only the batch can tell.
    proc = _check_script("numpy_batch.py", ["--vary", "NUMPY_BATCH_SHIFT=0,1"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith('DIVERGED at step 1 (run "NUMPY_BATCH_SHIFT=1" vs "run 1")')
    assert "batch differs" in proc.stdout


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("", None),
        (
            "ckpt_first",
            "restored the Trace at step 4 while the Checkpointer had counted 5 steps: the two "
            "count different steps (ckpt.step() ran before trace.step() in step 5",
        ),
        (
            "micro",
            "restored the Trace at step 10 while the Checkpointer had counted 5 steps: the two "
            "count different steps (trace.step() runs more often than ckpt.step()",
        ),
    ],
)
def test_resume_advice_says_what_is_wrong(tmp_path: Path, mode: str, message: str | None) -> None:
    proc = _check_script(
        "resume_counts.py", ["--resume-at", "5"], tmp_path, {"RESUME_COUNTS": mode}
    )
    if message is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout
    assert "pass the Trace to the Checkpointer" not in proc.stdout  # it already does
