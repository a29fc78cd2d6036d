"""Hardening of the core (issue 11): RNG capture/restore, seeding arguments, cuBLAS check, audit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import torchrepro.core._rng as rng_mod
from torchrepro import (
    DeterminismError,
    RNGStateError,
    audit,
    derive_seed,
    deterministic,
    get_rng_state,
    seed_everything,
    set_rng_state,
)


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, allocated: int) -> dict[str, bool]:
    """A one-GPU CUDA whose initialisation happens on the first RNG-state query, as torch's does."""
    cuda = {"initialized": False}

    def get_rng_state_all() -> list[torch.Tensor]:
        cuda["initialized"] = True  # torch.cuda.get_rng_state() calls _lazy_init()
        return [torch.zeros(16, dtype=torch.uint8)]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda["initialized"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", get_rng_state_all)
    monkeypatch.setattr(
        torch.cuda, "memory_stats", lambda d: {"allocation.all.allocated": allocated}
    )
    return cuda


def test_rng_query_does_not_initialise_cuda_so_strict_still_works(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = _fake_cuda(monkeypatch, allocated=0)
    state = get_rng_state()
    assert not cuda["initialized"] and state["cuda"] == []
    with deterministic("strict") as settings:  # refused before, once the query had initialised CUDA
        assert settings.changed["env.CUBLAS_WORKSPACE_CONFIG"] == (None, ":4096:8")


def test_cuda_initialised_without_allocations_is_not_refused(monkeypatch):
    # cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its first workspace, not at CUDA init.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = _fake_cuda(monkeypatch, allocated=0)
    cuda["initialized"] = True
    with deterministic("strict"):
        pass
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"allocation.all.allocated": 1})
    with pytest.raises(DeterminismError, match="already allocated CUDA memory"):
        deterministic("strict")


def test_cuda_state_captured_once_initialised(monkeypatch):
    cuda = _fake_cuda(monkeypatch, allocated=0)
    cuda["initialized"] = True
    assert len(get_rng_state()["cuda"]) == 1


def _bad(domain: str):
    def mutate(state):
        if domain == "torch":
            state["torch"] = torch.zeros(10, dtype=torch.uint8)  # another build's layout
        elif domain == "torch-dtype":
            state["torch"] = state["torch"].to(torch.int64)
        elif domain == "python":
            state["python"] = [3, state["python"][1][:10], None]
        elif domain == "python-type":
            state["python"] = [3, ["x"] * 625, None]
        elif domain == "numpy":
            state["numpy"] = {**state["numpy"], "keys": [1, 2, 3]}
        elif domain == "cuda":
            state["cuda"] = [torch.zeros(16, dtype=torch.float32)]
        return state

    return mutate


@pytest.mark.parametrize(
    "domain", ["torch", "torch-dtype", "python", "python-type", "numpy", "cuda"]
)
def test_bad_rng_state_changes_nothing(domain):
    state = _bad(domain)(get_rng_state())
    before = get_rng_state()
    with pytest.raises(RNGStateError):
        set_rng_state(state)
    # Python's RNG is no longer replaced before torch's or NumPy's fails.
    after = get_rng_state()
    assert after["python"] == before["python"]
    assert after["numpy"] == before["numpy"]
    assert torch.equal(after["torch"], before["torch"])


@pytest.mark.rng_changes
def test_failure_while_applying_rolls_everything_back(monkeypatch):
    target = get_rng_state()
    random.random(), np.random.random(), torch.rand(1)
    before = get_rng_state()

    real = torch.set_rng_state

    def broken(new_state):
        if new_state is target["torch"]:
            raise RuntimeError("device gone")
        real(new_state)

    monkeypatch.setattr(torch, "set_rng_state", broken)
    with pytest.raises(RNGStateError, match="put back as it was: device gone"):
        set_rng_state(target)
    monkeypatch.undo()
    after = get_rng_state()
    assert after["python"] == before["python"] and after["numpy"] == before["numpy"]


@pytest.mark.parametrize("value", ["no", 1, None])
def test_bool_arguments_are_bools(value):
    with pytest.raises(TypeError, match="per_rank must be True or False"):
        seed_everything(3, per_rank=value)
    with pytest.raises(TypeError, match="strict must be a bool"):
        set_rng_state(get_rng_state(), strict=value)


def test_lone_surrogate_in_derive_seed_is_a_clear_error():
    with pytest.raises(ValueError, match=r"derive_seed path items must be encodable as UTF-8"):
        derive_seed(0, "aug", "\ud800")


class _Counting(torch.nn.Module):
    """Forward changes a non-persistent buffer (in place, or by rebinding it)."""

    def __init__(self, rebind: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()), persistent=False)
        self.rebind = rebind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rebind:
            self.calls = self.calls + 1
        else:
            self.calls.add_(1)
        return self.linear(x) * self.calls


@pytest.mark.rng_changes
@pytest.mark.parametrize("rebind", [False, True])
def test_audit_restores_non_persistent_buffers(rebind):
    model = _Counting(rebind)
    buffer = model.calls
    report = audit(model, torch.ones(2, 3), loss_fn=lambda y: y.sum())
    assert report.deterministic, str(report)
    assert model.calls is buffer and float(buffer) == 0.0  # the model is left as it was


def test_rng_module_reports_no_cuda_state_for_an_uninitialised_device():
    assert rng_mod.rng_state_problems({**get_rng_state(), "cuda": []}) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_queries_leave_cuda_uninitialised(run_python):
    code = (
        "import torch, torchrepro\n"
        "torchrepro.get_rng_state()\n"
        "with torchrepro.isolated_rng():\n"
        "    pass\n"
        "assert not torch.cuda.is_initialized()\n"
        "with torchrepro.deterministic('strict'):\n"
        "    x = torch.ones(4, 4, device='cuda')\n"
        "    state = torchrepro.get_rng_state()\n"
        "    assert len(state['cuda']) == torch.cuda.device_count()\n"
        "    torchrepro.set_rng_state(state)\n"
    )
    run_python(code, env={"CUBLAS_WORKSPACE_CONFIG": ""})


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_bad_dist_timeout_names_the_variable(monkeypatch, value):
    from torchrepro.core import _dist

    monkeypatch.setenv("TORCHREPRO_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match="TORCHREPRO_DIST_TIMEOUT must be a number of seconds > 0"):
        _dist.timeout()


def test_dist_timeout_default_and_override(monkeypatch):
    from torchrepro.core import _dist

    monkeypatch.delenv("TORCHREPRO_DIST_TIMEOUT", raising=False)
    assert _dist.timeout() == 300.0
    monkeypatch.setenv("TORCHREPRO_DIST_TIMEOUT", "2.5")
    assert _dist.timeout() == 2.5
