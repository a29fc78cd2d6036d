"""What a checkpoint evidently lacks, said at the save (issue 23, rules 5 and 9)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import torchrepro
from torchrepro.checkpoint._io import read_checkpoint
from torchrepro.core._rng import isolated_rng


@pytest.fixture(autouse=True)
def _own_rng():
    with isolated_rng():  # the models' initialisation draws from the global RNG
        yield


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: bool) -> None:
    model(torch.ones(2, 3)).sum().backward()
    if step:
        optimizer.step()


@pytest.mark.parametrize("saved", [False, True])
def test_an_unsaved_scheduler_of_a_saved_optimizer_is_named_at_the_first_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, saved: bool
) -> None:
    model, optimizer = _setup()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    objects = {"model": model, "optimizer": optimizer}
    if saved:
        objects["scheduler"] = scheduler
    ckpt = torchrepro.Checkpointer(tmp_path / "c.pt", every=1, **objects)
    with caplog.at_level(logging.WARNING, logger="torchrepro"):
        for _ in range(2):
            _train(model, optimizer, step=True)
            scheduler.step()
            ckpt.step()
    warned = [r.getMessage() for r in caplog.records if "StepLR" in r.getMessage()]
    notes = read_checkpoint(tmp_path / "c.pt")[0]["meta"].get("notes", [])
    if saved:
        assert warned == [] and notes == []
    else:
        assert len(warned) == 1  # once, not at every save
        assert (
            "the LR scheduler StepLR of the saved optimizer 'optimizer' is not saved" in warned[0]
        )
        assert any("StepLR" in n for n in notes)  # every save carries it, for a resume


def test_an_unsaved_grad_scaler_in_use_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    model, optimizer = _setup()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    ckpt = torchrepro.Checkpointer(tmp_path / "c.pt", every=1, model=model, optimizer=optimizer)
    with caplog.at_level(logging.WARNING, logger="torchrepro"):
        ckpt.step()
    assert any("GradScaler in use is not saved" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stepped", [True, False])
def test_a_save_in_the_middle_of_gradient_accumulation_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stepped: bool
) -> None:
    model, optimizer = _setup()
    ckpt = torchrepro.Checkpointer(tmp_path / "c.pt", every=1, model=model, optimizer=optimizer)
    with caplog.at_level(logging.WARNING, logger="torchrepro"):
        # zero_grad() first, backward, step: .grad is non-zero at the save, yet nothing is
        # lost, since the next step zeroes it; only a backward() after the last step() is.
        optimizer.zero_grad()
        _train(model, optimizer, step=stepped)
        ckpt.step()
    middle = [r for r in caplog.records if "middle of gradient accumulation" in r.getMessage()]
    assert len(middle) == (0 if stepped else 1)


def test_restore_differences_names_the_hyperparameter_first(tmp_path: Path) -> None:
    from torchrepro.check._restore import restore_differences

    runs = []
    for name, lr in (("run1", 0.1), ("run3", 0.4)):
        directory = tmp_path / name
        directory.mkdir()
        torch.manual_seed(0)  # the same weights in both (the fixture restores the RNG)
        model, optimizer = _setup()
        for group in optimizer.param_groups:
            group["lr"] = lr
        if name == "run3":
            with torch.no_grad():
                model.bias.add_(1)
        trace = torchrepro.Trace(directory / "trace.jsonl")
        ckpt = torchrepro.Checkpointer(
            directory / "c.pt", every=4, model=model, optimizer=optimizer, trace=trace
        )
        ckpt.steps = 7
        ckpt.save()  # without TORCHREPRO_KEEP_CHECKPOINTS: keep it by its kept name
        (directory / "c.pt").rename(directory / "checkpoint.pt.step7")
        runs.append(directory)
    found = restore_differences(runs[0], runs[1], resume_at=5)
    assert found is not None
    assert found.startswith("the first save after the resume (step 7) differs")
    assert "optimizer['param_groups'][0]['lr']: 0.1 vs 0.4" in found
    assert "1 tensor (model['bias'], ...)" in found
    assert "trace" not in found  # each run's own trace path is not a difference
    assert restore_differences(runs[0], runs[0], resume_at=5) is None
    assert restore_differences(runs[0], runs[1], resume_at=7) is None  # no save after the stop
