"""Batches fetched by another thread are paired with steps in the order they were fetched
(issue 23, rule 6), in process and end to end through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from torchrepro.core import _runinfo

SCRIPT = str(Path(__file__).parent / "scripts" / "prefetch_thread.py")


@pytest.fixture(autouse=True)
def _fresh_notes() -> Iterator[None]:
    _runinfo.clear()
    yield
    _runinfo.clear()


def _fetch_in_thread(batches: list[object]) -> None:
    thread = threading.Thread(target=lambda: [_runinfo.note_batch(b) for b in batches])
    thread.start()
    thread.join()


def test_steps_take_another_threads_batches_in_fetch_order() -> None:
    _runinfo.note_tracing()
    _fetch_in_thread(["b1", "b2", "b3"])  # the thread ran three batches ahead
    assert [_runinfo.take_batch() for _ in range(4)] == ["b1", "b2", "b3", None]
    # a batch the main thread fetched is the one its step consumed
    _fetch_in_thread(["b4"])
    _runinfo.note_batch("main")
    assert _runinfo.take_batch() == "main"
    assert _runinfo.take_batch() == "b4"


def test_without_a_trace_no_batch_is_held() -> None:
    _fetch_in_thread(["b1"])
    assert _runinfo.take_batch() is None


def test_a_thread_far_ahead_loses_the_pairing_and_records_none() -> None:
    _runinfo.note_tracing()
    _fetch_in_thread(list(range(_runinfo.MAX_AHEAD + 1)))
    assert _runinfo.take_batch() is None  # which batch a step took is unknown: say nothing
    _fetch_in_thread(["late"])
    assert _runinfo.take_batch() is None


@pytest.mark.slow
def test_a_prefetch_thread_gives_identical_runs_across_a_resume_at_an_epoch_end(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCHREPRO_SEED"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchrepro",
            "check",
            "--runs",
            "3",
            "--resume-at",
            "6",
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
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("REPRODUCIBLE: 4 runs x 12 steps bitwise identical")
