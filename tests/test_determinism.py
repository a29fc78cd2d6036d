from __future__ import annotations

import os

import pytest
import torch

from torchrepro import DeterminismError, TorchreproWarning, deterministic


@pytest.fixture(autouse=True)
def _no_cublas(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "x")  # records the original for undo
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")


def test_strict_sets_and_restores_everything():
    with deterministic("strict") as settings:
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert getattr(torch.backends.mkldnn, "deterministic", True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert "deterministic_algorithms" in settings.changed
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_warn_mode_is_warn_only():
    with deterministic("warn"):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_restores_on_exception_and_keeps_existing_cublas(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.backends.cudnn.benchmark = True
    try:
        with pytest.raises(KeyError), deterministic("strict"):
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
            assert not torch.backends.cudnn.benchmark
            raise KeyError
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_off_restores_pytorch_defaults():
    with deterministic("strict"), deterministic("off") as off:
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic
        assert off.mode == "off"


def test_tf32_false_and_true():
    with deterministic("strict", tf32=False):
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    with deterministic("strict", tf32=True):
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"


def test_fill_uninitialized_memory_maps_to_torch_flag():
    with deterministic("strict", fill_uninitialized_memory=False):
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert torch.utils.deterministic.fill_uninitialized_memory is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CPU op lacks a deterministic kernel")
def test_strict_raises_on_a_nondeterministic_cuda_op():
    with deterministic("strict"), pytest.raises(RuntimeError, match="deterministic"):
        torch.zeros(4, 4, device="cuda").index_add_(
            0, torch.tensor([0, 0], device="cuda"), torch.ones(2, 4, device="cuda")
        )
    with deterministic("warn"), pytest.warns(UserWarning, match="deterministic"):
        torch.zeros(4, 4, device="cuda").index_add_(
            0, torch.tensor([0, 0], device="cuda"), torch.ones(2, 4, device="cuda")
        )


@pytest.mark.parametrize("mode", ["on", "Strict", "", None, 1])
def test_bad_mode_lists_valid_ones(mode):
    with pytest.raises(ValueError, match=r"mode must be one of 'strict', 'warn', 'off', got"):
        deterministic(mode)  # type: ignore[arg-type]


def test_bad_flags_rejected():
    with pytest.raises(TypeError, match=r"fill_uninitialized_memory must be a bool"):
        deterministic(fill_uninitialized_memory=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tf32 must be True, False or None"):
        deterministic(tf32="no")  # type: ignore[arg-type]


def test_cuda_memory_already_allocated(monkeypatch):
    # cuBLAS reads CUBLAS_WORKSPACE_CONFIG at its first workspace (a GPU matmul, which needs
    # CUDA memory), not at CUDA init: refuse only once CUDA memory has been allocated.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"allocation.all.allocated": 4})
    with pytest.raises(DeterminismError, match=r"already allocated CUDA memory.*torchrepro run"):
        deterministic("strict")
    assert not torch.are_deterministic_algorithms_enabled()  # nothing half-applied
    with (
        pytest.warns(TorchreproWarning, match="cuBLAS may already have created its workspace"),
        deterministic("warn"),
    ):
        pass


def test_str_lists_changes():
    with deterministic("strict") as settings:
        assert "cudnn.deterministic: False -> True" in str(settings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_strict_matmul_is_bitwise_repeatable():
    with deterministic("strict"):
        a = torch.randn(512, 512, device="cuda")
        assert torch.equal(a @ a, a @ a)
