"""audit(): names the nondeterministic module, and leaves everything as it was."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from torchrepro.core._rng import isolated_rng
from torchrepro.trace._audit import AuditReport, audit


class Noise(nn.Module):
    """Adds noise from the OS: no seed can make it repeat."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.frombuffer(bytearray(os.urandom(4 * x.numel())), dtype=torch.int32)
        return x + noise.reshape(x.shape).to(x.dtype) * 1e-12


class Scatter(nn.Module):
    """Writes with put_ (duplicate indices): PyTorch flags it on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x).reshape(-1)
        out.put_(torch.zeros(2, dtype=torch.long), x.reshape(-1)[:2].detach(), accumulate=False)
        return x + out.reshape(x.shape)


def _build(make: Callable[[], list[nn.Module]]) -> nn.Module:
    with isolated_rng():  # default initialisation draws from the global RNG
        return nn.Sequential(*make())


def _cnn() -> nn.Module:
    with isolated_rng():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(4 * 8 * 8, 10),
        )


def _snapshot(model: nn.Module) -> tuple[object, ...]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [
        (n, None if p.grad is None else (id(p.grad), p.grad.clone()))
        for n, p in model.named_parameters()
    ]
    modes = [(n, m.training) for n, m in model.named_modules()]
    return state, grads, modes


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    state_a, grads_a, modes_a = a
    state_b, grads_b, modes_b = b
    assert isinstance(state_a, dict) and isinstance(state_b, dict)
    assert isinstance(grads_a, list) and isinstance(grads_b, list)
    if state_a.keys() != state_b.keys() or not all(
        torch.equal(state_a[k], state_b[k]) for k in state_a
    ):
        return False
    for (na, ga), (nb, gb) in zip(grads_a, grads_b, strict=True):
        if na != nb or (ga is None) != (gb is None):
            return False
        if ga is not None and (ga[0] != gb[0] or not torch.equal(ga[1], gb[1])):
            return False
    return bool(modes_a == modes_b)


def _inputs(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_names_planted_nondeterministic_submodule() -> None:
    model = _build(lambda: [nn.Linear(6, 6), nn.ReLU(), Noise(), nn.Linear(6, 2)])
    report = audit(model, _inputs(3, 6), loss_fn=lambda y: y.square().sum())
    assert not report.deterministic
    assert report.first_module == "2"
    assert report.modules == ["2", "3", "(model)"]
    assert report.module_types["2"] == "Noise"
    assert report.grads == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert report.loss_differs
    text = str(report)
    assert "NOT deterministic" in text
    assert "first module whose output differed: 2 (Noise)" in text


def test_nested_qualified_name() -> None:
    model = _build(lambda: [nn.Linear(6, 6), nn.Sequential(nn.Tanh(), Noise()), nn.Linear(6, 1)])
    report = audit(model, _inputs(3, 6))
    assert report.first_module == "1.1"
    assert report.backward is False  # output of shape (3, 1) is not a scalar and no loss_fn


def test_deterministic_cnn_with_dropout_and_batchnorm_in_train_mode() -> None:
    model = _cnn().train()
    report = audit(model, _inputs(5, 1, 8, 8), loss_fn=lambda y: y.logsumexp(1).mean(), runs=3)
    assert report.deterministic, str(report)
    assert (report.first_module, report.grads, report.modules, report.flagged_ops) == (
        None,
        [],
        [],
        [],
    )
    assert report.backward
    assert report.runs == 3
    assert str(report).startswith("audit: deterministic: 3 runs (forward and backward)")


def test_scalar_output_triggers_backward() -> None:
    class Scalar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).sum()

    with isolated_rng():
        model = Scalar()
    report = audit(model, _inputs(2, 4))
    assert report.backward and report.deterministic


def test_model_rng_and_flags_are_left_unchanged() -> None:
    model = _cnn().train()
    model[2].eval()  # a mixed mode must survive
    x = _inputs(5, 1, 8, 8)
    with isolated_rng():
        model(x).sum().backward()  # real gradients, to check they are not accumulated into
    model[5].bias.grad = None
    before = _snapshot(model)
    rng = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    audit(model, x, loss_fn=lambda y: y.sum())
    assert _same(before, _snapshot(model))
    assert random.getstate() == rng[0]
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert torch.equal(torch.get_rng_state(), rng[2])
    assert (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_snapshot_detects_changes() -> None:
    """The helper above must be able to fail: a training step changes the snapshot."""
    model = _cnn().train()
    before = _snapshot(model)
    with isolated_rng():
        model(_inputs(5, 1, 8, 8)).sum().backward()
    assert not _same(before, _snapshot(model))


def test_hooks_removed_and_state_restored_when_model_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = _build(lambda: [nn.Linear(3, 3), nn.BatchNorm1d(3), Boom()])
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        audit(model, _inputs(4, 3))
    assert all(not m._forward_hooks for m in model.modules())
    assert _same(before, _snapshot(model))


def test_flags_ops_pytorch_reports_and_restores_setting() -> None:
    model = _build(lambda: [nn.Linear(4, 4), Scatter()])
    report = audit(model, _inputs(2, 4), loss_fn=lambda y: y.sum())
    assert report.flagged_ops == ["put_"]
    assert report.deterministic  # the op flagged is harmless here: its two writes agree
    assert "ops PyTorch reports as nondeterministic here: put_" in str(report)
    assert not torch.are_deterministic_algorithms_enabled()


def test_input_gradients_are_restored() -> None:
    model = _build(lambda: [nn.Linear(4, 1)])
    x = _inputs(2, 4).requires_grad_()
    grad = x.grad = torch.full((2, 4), 7.0)
    audit(model, x, loss_fn=lambda y: y.sum())
    assert x.grad is grad
    assert torch.equal(grad, torch.full((2, 4), 7.0))
    y = _inputs(2, 4).requires_grad_()
    audit(model, y, loss_fn=lambda out: out.sum())
    assert y.grad is None


def test_outputs_in_tuples_and_dicts_are_checked() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.noise = Noise()

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"clean": x, "parts": (x * 2, [self.noise(x)])}

    with isolated_rng():
        model = Pair()
    report = audit(model, _inputs(2, 3))
    assert report.modules == ["noise", "(model)"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"runs": 1},
            ValueError,
            r"runs must be an int >= 2 \(runs are compared with the first\), got 1",
        ),
        ({"runs": 2.0}, TypeError, r"runs must be an int >= 2, got float 2\.0"),
        ({"loss_fn": 3}, TypeError, r"loss_fn must be callable or None, got int"),
        ({"loss_fn": lambda y: 1.0}, TypeError, r"loss_fn must return a torch\.Tensor, got float"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    model = _build(lambda: [nn.Linear(2, 2)])
    with pytest.raises(error, match=match):
        audit(model, _inputs(1, 2), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        audit("model")  # type: ignore[arg-type]


def test_report_str_lists_everything() -> None:
    report = AuditReport(
        False, "a.b", ["w"], ["index_add_cuda_"], ["a.b", "a"], True, 2, True, {"a.b": "Conv2d"}
    )
    assert str(report).splitlines() == [
        "audit: NOT deterministic: 2 runs (forward and backward) differed",
        "  first module whose output differed: a.b (Conv2d)",
        "  2 modules' outputs differed: a.b, a",
        "  the loss differed",
        "  1 gradients differed: w",
        "  ops PyTorch reports as nondeterministic here: index_add_cuda_",
    ]
