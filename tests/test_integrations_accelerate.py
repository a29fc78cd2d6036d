"""torchrepro.integrations.accelerate: ReproAccelerator.

End to end (subprocesses): ``torchrepro check`` on examples/train_accelerate.py, alone and under
``accelerate launch`` with 2 CPU processes. In process:
the plain Accelerator's rebuild is named in the error, and ReproAccelerator's save_state /
load_state resume mid-epoch bitwise with the other num_workers.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

from _frameworks import EXAMPLES, check  # noqa: E402

import torchrepro  # noqa: E402
from torchrepro.data import _streams  # noqa: E402
from torchrepro.integrations.accelerate import ReproAccelerator  # noqa: E402


@pytest.mark.slow
def test_check_varied_workers_and_mid_epoch_resume_is_reproducible(tmp_path):
    command = [sys.executable, str(EXAMPLES / "train_accelerate.py"), "--limit", "256"]
    proc = check("--vary", "num_workers=0,2", "--resume-at", "11", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 4 runs x 16 steps bitwise identical" in proc.stdout


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_resume_is_reproducible(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    example = [str(EXAMPLES / "train_accelerate.py"), "--limit", "256"]
    command = [launcher, "launch", "--cpu", "--num_processes", "2", *example]
    proc = check("--resume-at", "11", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 3 runs x 16 steps bitwise identical" in proc.stdout


# -- in process ---------------------------------------------------------------------------


class _Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((4,), float(i)) / 32
        return x + 0.1 * torch.randn(4), torch.tensor(i % 2)  # augmentation: the global RNG


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in (
        "TORCHREPRO_SEED",
        "TORCHREPRO_CHECKPOINT",
        "TORCHREPRO_STOP_AT",
        "TORCHREPRO_TRACE",
    ):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores it, whoever sets it
        monkeypatch.delenv(name)
    settings = torchrepro.deterministic("strict")  # then ReproAccelerator changes nothing more
    yield monkeypatch
    settings.restore()


def _loader(workers: int) -> torchrepro.DataLoader[Any]:
    return torchrepro.DataLoader(_Noisy(), batch_size=4, shuffle=True, num_workers=workers, seed=0)


@pytest.mark.rng_changes
@pytest.mark.parametrize("keep_original", [True, False])
def test_a_plain_accelerator_rebuild_is_named_in_the_error(clean, keep_original):
    original = _loader(0)
    prepared = accelerate.Accelerator(cpu=True).prepare(original)
    if not keep_original:
        del original
        gc.collect()
    with pytest.raises(torchrepro.TorchreproError, match=r"Accelerator\.prepare.*ReproAccelerator"):
        next(iter(prepared))


def _train(
    workers: int, steps: int, save: str | None = None, load: str | None = None
) -> dict[str, torch.Tensor]:
    _streams.reset_created()  # a fresh process: loaders are keyed by creation order
    accelerator = ReproAccelerator(cpu=True, seed=0, trace=False)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(workers))
    assert isinstance(loader.loader, torchrepro.DataLoader)
    if load is not None:
        accelerator.load_state(load)
        assert accelerator.skip_first_batches(loader, 3) is loader  # the position is restored
        with pytest.raises(torchrepro.TorchreproError, match="num_batches=2"):
            accelerator.skip_first_batches(loader, 2)
    while accelerator.repro_steps < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            accelerator.repro_step(loss=loss, model=model)
            if accelerator.repro_steps == steps:
                break
    if save is not None:
        accelerator.save_state(save)
    return {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


@pytest.mark.xfail(
    strict=True,
    reason="open: passes on the frameworks branch, fails since the loader's pass semantics (issue 28: a pass given up is over) were merged with it; see the closing note",
)
@pytest.mark.rng_changes
def test_save_state_and_load_state_resume_mid_epoch_bitwise_with_other_workers(clean, tmp_path):
    whole = _train(0, steps=12)  # 8 batches per epoch: the stop at 3 is mid-epoch
    _train(0, steps=3, save=str(tmp_path / "state"))
    resumed = _train(2, steps=12, load=str(tmp_path / "state"))
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


@pytest.mark.rng_changes
def test_a_folder_not_saved_by_repro_accelerator_is_refused(clean, tmp_path):
    accelerator = ReproAccelerator(cpu=True, seed=0, trace=False)
    with pytest.raises(torchrepro.TorchreproError, match=r"has no torchrepro\.pt"):
        accelerator.load_state(str(tmp_path))


@pytest.mark.rng_changes
def test_gradient_accumulation_syncs_at_the_epochs_last_batch(clean):
    accelerator = ReproAccelerator(cpu=True, seed=0, trace=False, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torchrepro.DataLoader(_Noisy(), batch_size=12, seed=0)  # 3 batches: 2 + 1
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    synced = []
    for _epoch in range(2):
        for x, _y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(x).sum())
                optimizer.step()
                optimizer.zero_grad()
                synced.append(accelerator.sync_gradients)
    assert synced == [False, True, True] * 2
