"""Checkpoint faults under torch.distributed (2 gloo ranks on CPU): every rank fails, in
bounded time, with a message naming the rank and the cause; none hangs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parent / "scripts" / "dist_faults.py"
TIMEOUT = 8  # TORCHREPRO_DIST_TIMEOUT for the run, seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    out = tmp_path_factory.mktemp("dist-faults")
    port, procs = _free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "TORCHREPRO_DIST_TIMEOUT": str(TIMEOUT),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    try:
        for rank, proc in enumerate(procs):
            try:
                _out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                errors.append(f"rank {rank} hung")
                continue
            if proc.returncode != 0:
                errors.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not errors, "\n".join(errors)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _outcome(outcomes, rank: int, scenario: str) -> str:
    result = outcomes[rank][scenario]
    assert result["seconds"] < TIMEOUT, (scenario, rank, result)  # nobody waited for a timeout
    return str(result["outcome"])


def test_failing_state_dict_on_one_rank_fails_every_rank(outcomes):
    assert _outcome(outcomes, 1, "state_dict fails on rank 1").startswith(
        "CheckpointError: c.state_dict() failed: RuntimeError: boom"
    )
    assert "rank 1: CheckpointError: c.state_dict() failed" in _outcome(
        outcomes, 0, "state_dict fails on rank 1"
    )


def test_bad_extra_on_one_rank_fails_every_rank(outcomes):
    assert "TypeError: extra cannot be saved: extra['acc']: numpy.float64" in _outcome(
        outcomes, 1, "bad extra on rank 1"
    )
    assert "rank 1: TypeError: extra cannot be saved" in _outcome(
        outcomes, 0, "bad extra on rank 1"
    )


def test_different_paths_are_an_error_on_every_rank(outcomes):
    for rank in range(2):
        message = _outcome(outcomes, rank, "different paths")
        assert "ranks passed different paths" in message
        assert "p0.pt" in message and "p1.pt" in message


@pytest.mark.parametrize("scenario", ["rank 1 loads a missing path", "rank 1 cannot read"])
def test_a_rank_that_cannot_read_fails_every_rank_before_any_collective(outcomes, scenario):
    cause = "no checkpoint at" if "missing" in scenario else "Permission denied"
    for rank in range(2):
        message = _outcome(outcomes, rank, scenario)
        assert message.startswith("CheckpointError"), message
        assert cause in message
        if rank == 0:
            assert "rank 1: CheckpointError" in message


def test_the_ranks_stay_in_step_after_failures(outcomes):
    for rank in range(2):
        assert _outcome(outcomes, rank, "good save") == "ok"
        assert _outcome(outcomes, rank, "good load") == "ok"


def test_a_rank_that_never_calls_is_named_after_the_timeout(outcomes):
    result = outcomes[0]["only rank 0 saves"]
    assert result["outcome"].startswith("CheckpointError: rank 0 waited in save_checkpoint(")
    assert f"rank 1 did not arrive within {TIMEOUT} s" in result["outcome"]
    assert "TORCHREPRO_DIST_TIMEOUT" in result["outcome"]
    assert TIMEOUT <= result["seconds"] < TIMEOUT + 20
