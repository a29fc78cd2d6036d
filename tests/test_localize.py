"""Localization: per-module checksums of one step, and the first module where two runs differ."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import torchrepro
from torchrepro.check._localize import compare_captures
from torchrepro.trace._capture import CAPTURE_SUFFIX, read_capture


class Noise(torch.nn.Module):
    """Adds noise from its own generator, reseeded with ``seed`` at call ``at``: planted
    nondeterminism that starts at that step when two runs' seeds differ."""

    def __init__(self, seed: int, at: int) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)
        self.seed, self.at, self.calls = seed, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            self.gen.manual_seed(self.seed)
        return x + 0.01 * torch.randn(x.shape, generator=self.gen)


def _model(noise_seed: int | None, at: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(4, 8), torch.nn.ReLU()]
    if noise_seed is not None:
        layers.append(Noise(noise_seed, at))
    layers += [torch.nn.Linear(8, 2)]
    return torch.nn.Sequential(*layers)


def _train(
    path: Path, model: torch.nn.Module, steps: int, *, resume_at: int = 0, data_seed: int = 1
) -> None:
    """A plain loop with a Trace; the capture ends it with SystemExit at the captured step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = torchrepro.Trace(path)
    if resume_at:
        trace.load_state_dict({"version": 1, "step": resume_at})
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(resume_at, steps):
        x = torch.randn(5, 4, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.step(loss=loss, model=model)


def _capture(
    tmp_path: Path, name: str, noise_seed: int | None, step: int, data_seed: int = 1
) -> dict:
    path = tmp_path / f"{name}.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHREPRO_LOCALIZE_STEP", str(step))
    try:
        with torchrepro.isolated_rng(), pytest.raises(SystemExit) as stopped:
            _train(path, _model(noise_seed, at=step), 10, data_seed=data_seed)
    finally:
        mp.undo()
    assert stopped.value.code == 0
    return read_capture(str(path) + CAPTURE_SUFFIX)


@pytest.mark.parametrize("step", [1, 3])
def test_planted_noise_module_is_named_first(tmp_path, step):
    a = _capture(tmp_path, "a", noise_seed=1, step=step)
    b = _capture(tmp_path, "b", noise_seed=2, step=step)
    found = compare_captures(a, b)
    assert (found.module, found.module_class, found.phase) == ("2", "Noise", "forward output")
    # In forward, what runs after it differs too and the layers before it do not.
    assert found.modules[:3] == ["2", "3", "(model)"]
    assert "first difference in `2` (Noise) forward output" in found.describe()


def test_identical_runs_localize_nothing(tmp_path):
    a = _capture(tmp_path, "a", noise_seed=1, step=2)
    b = _capture(tmp_path, "b", noise_seed=1, step=2)
    found = compare_captures(a, b)
    assert found.module is None and found.param is None
    assert "identical in both re-runs" in found.describe()


def test_capture_records_forward_in_return_order_then_backward(tmp_path):
    cap = _capture(tmp_path, "a", noise_seed=None, step=2)
    forward = [e["module"] for e in cap["events"] if e["phase"] == "forward"]
    backward = [e["module"] for e in cap["events"] if e["phase"] == "backward"]
    assert forward == ["0", "1", "2", "(model)"]
    # Gradients reach the last layer's output (the model's output too) first.
    assert set(backward[:2]) == {"2", "(model)"} and backward[2:] == ["1", "0"]
    assert [g["name"] for g in cap["param_grads"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert cap["audit_error"] is None and cap["audit"]["deterministic"] is True


def test_resumed_capture_equals_uninterrupted(tmp_path):
    """Arming at load_state_dict (resume at N-1) captures the same step as a full run."""
    full = _capture(tmp_path, "full", noise_seed=None, step=4)
    # Resume needs the state at step 3: train to 3 in the same process first.
    with torchrepro.isolated_rng():
        model = _model(None)
        _train(tmp_path / "pre.jsonl", model, 3)
    path = tmp_path / "resumed.jsonl"
    shutil.copyfile(tmp_path / "pre.jsonl", path)  # the trace the resumed state continues
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHREPRO_LOCALIZE_STEP", "4")
    try:
        with torchrepro.isolated_rng(), pytest.raises(SystemExit):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            trace = torchrepro.Trace(path)
            trace.load_state_dict({"version": 1, "step": 3})
            gen = torch.Generator().manual_seed(1)
            xs = [torch.randn(5, 4, generator=gen) for _ in range(4)]
            loss = model(xs[3]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.step(loss=loss, model=model)
    finally:
        mp.undo()
    resumed = read_capture(str(path) + CAPTURE_SUFFIX)
    assert [e["checksums"] for e in resumed["events"]] != []
    assert compare_captures(full, resumed).module is None


def test_flagged_ops_come_from_audit(tmp_path):
    class Put(torch.nn.Module):
        """Writes with put_ (duplicate indices): PyTorch flags it on CPU."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(x).reshape(-1)
            out.put_(torch.zeros(2, dtype=torch.long), x.reshape(-1)[:2].detach())
            return x + out.reshape(x.shape)

    cap = tmp_path / "t.jsonl"
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHREPRO_LOCALIZE_STEP", "1")
    try:
        with torchrepro.isolated_rng(), pytest.raises(SystemExit):
            torch.manual_seed(0)
            _train(cap, torch.nn.Sequential(torch.nn.Linear(4, 4), Put()), 3)
    finally:
        mp.undo()
    data = read_capture(str(cap) + CAPTURE_SUFFIX)
    assert data["flagged_ops"] == ["put_"]
    found = compare_captures(data, data)
    assert found.flagged_ops == ["put_"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_capture_needs_a_trace_file_and_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHREPRO_LOCALIZE_STEP", "1")
    monkeypatch.delenv("TORCHREPRO_TRACE", raising=False)
    with pytest.raises(
        ValueError, match="TORCHREPRO_LOCALIZE_STEP is set but the Trace writes no file"
    ):
        torchrepro.Trace()
    trace = torchrepro.Trace(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="needs the model"):
        trace.step(loss=1.0)
    monkeypatch.setenv("TORCHREPRO_LOCALIZE_STEP", "0")
    with pytest.raises(ValueError, match="TORCHREPRO_LOCALIZE_STEP must be an integer >= 1"):
        torchrepro.Trace(tmp_path / "t.jsonl")


def test_hooks_are_removed_after_the_capture(tmp_path):
    _capture(tmp_path, "a", noise_seed=None, step=1)
    hooks = torch.nn.modules.module._global_forward_hooks
    assert len(hooks) == 0


def test_read_capture_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(torchrepro.TraceError, match="not a torchrepro localize capture"):
        read_capture(bad)
    with pytest.raises(torchrepro.TraceError, match="did not reach the captured step"):
        read_capture(tmp_path / "missing.json")
    assert not os.path.exists(tmp_path / "missing.json")


@pytest.mark.rng_changes
@pytest.mark.parametrize("keep", ["1", ""])
def test_checkpointer_keeps_each_save_when_asked(tmp_path, monkeypatch, keep):
    monkeypatch.setenv("TORCHREPRO_KEEP_CHECKPOINTS", keep)
    model = torch.nn.Linear(2, 2)
    ckpt = torchrepro.Checkpointer(tmp_path / "c.pt", every=2, model=model)
    weights = []
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        weights.append(model.weight.detach().clone())
        ckpt.step()
    kept = sorted(p.name for p in tmp_path.glob("c.pt.step*"))
    assert kept == (["c.pt.step2", "c.pt.step4"] if keep else [])
    if keep:  # each kept file holds its own step's weights, not the latest
        again = torch.nn.Linear(2, 2)
        torchrepro.load_checkpoint(tmp_path / "c.pt.step2", model=again)
        assert torch.equal(again.weight, weights[1])


def test_a_different_model_input_is_said_first(tmp_path):
    """A loader Trace knows nothing of: the capture still sees that the batch differed."""
    a = _capture(tmp_path, "a", noise_seed=None, step=1, data_seed=1)
    b = _capture(tmp_path, "b", noise_seed=None, step=1, data_seed=2)
    found = compare_captures(a, b)
    assert found.input_differs and found.module == "0"
    assert found.describe().startswith("the model's input already differed")
    assert not compare_captures(a, a).input_differs


def test_check_does_not_rerun_unbounded_without_a_checkpoint(tmp_path, monkeypatch):
    """No checkpoint before the divergent step: no automatic re-run, and check says why."""
    from torchrepro.check._runner import run_check

    script = Path(__file__).resolve().parent / "scripts" / "tiny_train.py"
    monkeypatch.setenv("TINY_NUDGE_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("TINY_NO_CHECKPOINT", "1")
    monkeypatch.setenv("TORCHREPRO_TRACE_STATE_EVERY", "1")  # step 7 is exact: no pinpoint
    report = run_check([sys.executable, str(script)], runs=2, keep=tmp_path / "runs", seed=0)
    assert report.comparisons[0].first_step == 7 and report.comparisons[0].exact
    assert report.localization is None
    assert "no checkpoint before step 7 was kept" in report.localization_note
    assert not list((tmp_path / "runs").glob("localize*"))
    assert not list((tmp_path / "runs").glob("pinpoint*"))
