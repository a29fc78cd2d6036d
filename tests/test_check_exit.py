"""What runs leave behind is compared at exit (issue 23, rules 2, 3 and 7): the state of
the Checkpointer's objects and the RNGs, and the tensor files each run writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrepro.check._leftovers import file_differences, tensor_files

SCRIPT = str(Path(__file__).parent / "scripts" / "exit_state.py")


def test_tensor_files_are_read_tensor_by_tensor(tmp_path: Path) -> None:
    skip = tmp_path / "checks"
    (skip / "run1").mkdir(parents=True)
    torch.save(torch.ones(2), skip / "run1" / "own.pt")  # the check's own files
    torch.save(torch.ones(2), tmp_path / "old.pt")
    os.utime(tmp_path / "old.pt", (0, 0))  # written before the run
    since = time.time() - 1
    torch.save({"w": torch.ones(3), "n": 4}, tmp_path / "model.pt")
    np.savez(tmp_path / "arrays.npz", a=np.arange(3), b=np.zeros(2))
    (tmp_path / "notes.txt").write_text("not a tensor file")
    first = tensor_files(tmp_path, since, skip=skip)
    assert sorted(first) == ["arrays.npz", "model.pt"]
    torch.save({"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20]), "n": 4}, tmp_path / "model.pt")
    np.savez(tmp_path / "arrays.npz", a=np.arange(3), b=np.zeros(2))
    second = tensor_files(tmp_path, since, skip=skip)
    assert file_differences(first, second) == ["tensor model.pt: w"]
    assert file_differences(first, {"model.pt": first["model.pt"]}) == [
        "arrays.npz: written by one run only"
    ]


def _check(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHREPRO_SEED"}
    return subprocess.run(
        [sys.executable, "-m", "torchrepro", "check", *args, "--", sys.executable, SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_final_untraced_update_diverges_at_exit(tmp_path: Path) -> None:
    proc = _check(["--vary", "EXIT_NUDGE=0,1"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(
        'DIVERGED at exit (run "EXIT_NUDGE=1" vs "run 1"): tensor model[\'bias\']\n'
    ), proc.stdout


@pytest.mark.slow
def test_an_ema_left_out_of_the_checkpoint_is_a_resume_fault(tmp_path: Path) -> None:
    proc = _check(["--resume-at", "5"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(
        "RESUME FAULT: the resumed run differs from the uninterrupted one from its exit, "
        "every traced step agreeing (tensor ema.pt: "
    ), first


@pytest.mark.slow
def test_the_claim_lists_what_was_compared_at_exit(tmp_path: Path) -> None:
    proc = _check([], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == (
        "REPRODUCIBLE: 2 runs x 8 steps bitwise identical (every step's loss and batch; the "
        "traces hold no model state; at exit: the state of loader, model, optimizer, trace, "
        "RNG and the files ema.pt)"
    )
