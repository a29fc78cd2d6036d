"""Shared fixtures: every test leaves env vars, torch flags and RNG states as it found them."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchrepro.core._determinism
import torchrepro.core._seed
from torchrepro.data import _streams

REPO = Path(__file__).resolve().parent.parent

# The suite is not a training run: silence the PYTHONHASHSEED advice (test_seed tests it).
torchrepro.core._seed._hash_seed_warned = True


def _flags() -> dict[str, Any]:
    flags: dict[str, Any] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_threads": torch.get_num_threads(),
        "mkldnn.deterministic": getattr(torch.backends.mkldnn, "deterministic", None),
    }
    fill = getattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", None)
    flags["fill_uninitialized_memory"] = fill
    return flags


def _restore_flags(flags: dict[str, Any]) -> None:
    torch.use_deterministic_algorithms(
        flags["deterministic_algorithms"], warn_only=flags["warn_only"]
    )
    torch.backends.cudnn.deterministic = flags["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul.allow_tf32"]
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])
    torch.set_num_threads(flags["num_threads"])
    if flags["mkldnn.deterministic"] is not None:
        torch.backends.mkldnn.deterministic = flags["mkldnn.deterministic"]
    if flags["fill_uninitialized_memory"] is not None:
        torch.utils.deterministic.fill_uninitialized_memory = flags["fill_uninitialized_memory"]


def _env() -> dict[str, str]:
    # pytest's own variable, a cache dir torch exports lazily on first use of inductor config,
    # and the OpenMP switches scikit-learn exports when first imported.
    ignored = (
        "PYTEST_CURRENT_TEST",
        "TORCHINDUCTOR_CACHE_DIR",
        "KMP_DUPLICATE_LIB_OK",
        "KMP_INIT_AT_FORK",
    )
    return {k: v for k, v in os.environ.items() if k not in ignored}


def _rng() -> tuple[Any, ...]:
    return (random.getstate(), np.random.get_state(), torch.get_rng_state())


@pytest.fixture(autouse=True)
def _fresh_creation_order() -> None:
    """Each test builds its loaders as a fresh process would: the first is ``created:0``."""
    _streams.reset_created()


@pytest.fixture
def each_loader_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every loader built without a key of its own draws the stream ``created:0``, as the
    first loader of a fresh process does: for tests whose loaders stand for separate runs
    (the reference, the interrupted run, the run with workers) built in one process."""
    monkeypatch.setattr(_streams, "next_created", lambda: _streams.DEFAULT)


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Restore global state after each test, and fail the test that leaked it.

    Tests that change global state on purpose restore it themselves (or use
    ``monkeypatch``); a leak is a bug in the test or in torchrepro.
    """
    env = _env()
    flags = _flags()
    rng = _rng()
    warned = torchrepro.core._seed._hash_seed_warned
    requested = torchrepro.core._determinism._requested
    yield
    torchrepro.core._determinism._requested = requested  # deterministic() left applied
    leaks = []
    if _env() != env:
        changed = sorted(set(_env().items()) ^ set(env.items()))
        leaks.append(f"environment variables changed: {changed}")
        for key in set(_env()) - set(env):
            del os.environ[key]
        os.environ.update(env)
    now = _flags()
    if now != flags:
        leaks.append(
            f"torch flags changed: { {k: (flags[k], now[k]) for k in flags if flags[k] != now[k]} }"
        )
        _restore_flags(flags)
    state = _rng()
    same = (
        state[0] == rng[0]
        and state[1][1].tobytes() == rng[1][1].tobytes()
        and state[1][2:] == rng[1][2:]
        and torch.equal(state[2], rng[2])
    )
    if not same and not request.node.get_closest_marker("rng_changes"):
        leaks.append(
            "a global RNG (random, numpy or torch) was left changed; use torchrepro.isolated_rng()"
        )
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])
    torchrepro.core._seed._hash_seed_warned = warned
    if leaks:
        pytest.fail("test leaked global state: " + "; ".join(leaks), pytrace=False)


@pytest.fixture
def run_python(tmp_path: Path) -> Any:
    """Run a Python snippet in a fresh interpreter; return its CompletedProcess."""
    import subprocess

    def run(code: str, env: dict[str, str] | None = None, check: bool = True) -> Any:
        full_env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=tmp_path,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rng_changes: the test changes global RNG state on purpose")
    config.addinivalue_line(
        "markers",
        "cuda: needs or concerns CUDA; skipped without a GPU when marked explicitly; "
        "`pytest -m cuda` (benchmarks/gpu_check.sh) runs them all",
    )


def _concerns_cuda(item: pytest.Item) -> bool:
    """A test `-m cuda` selects without an explicit mark: CUDA in its name or its skip reason."""
    if "cuda" in item.name.lower():
        return True
    return any(
        "cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs CUDA (none available)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
        elif _concerns_cuda(item):
            item.add_marker(pytest.mark.cuda)
