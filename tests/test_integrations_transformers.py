"""torchrepro.integrations.transformers: ReproTrainer.

End to end (subprocesses): ``torchrepro check`` on examples/train_hf.py, alone and under a
2-process torchrun, and the failures ReproTrainer fixes (the Trainer's own loader depends on
``num_workers``, and its mid-epoch resume is not bitwise). In process: refusals and errors.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

from _frameworks import EXAMPLES, SCRIPTS, check, run_json, torchrun
from transformers import TrainingArguments

import torchrepro
from torchrepro.integrations.transformers import ReproTrainer

ARGS = ["--limit", "256"]  # 8 steps per epoch, 16 in all


@pytest.mark.slow
def test_check_varied_workers_and_mid_epoch_resume_is_reproducible(tmp_path):
    command = [sys.executable, str(EXAMPLES / "train_hf.py"), *ARGS]
    proc = check("--vary", "num_workers=0,2", "--resume-at", "11", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 4 runs x 16 steps bitwise identical" in proc.stdout


@pytest.mark.slow
def test_trainer_fails_without_the_integration_and_is_bitwise_with_it(tmp_path):
    result = run_json("hf_resume.py", tmp_path)
    assert result["plain"], "the plain Trainer's mid-epoch resume was expected to differ"
    assert result["plain_workers"], "the plain Trainer with 0 and 2 workers was expected to differ"
    assert result["repro"] == [], f"with ReproTrainer these tensors differ: {result['repro']}"


@pytest.mark.slow
def test_torchrun_two_processes_with_accumulation_and_bf16_resume_is_reproducible(tmp_path):
    # DDP, gradient accumulation and mixed precision all still work outside accelerate.prepare.
    command = torchrun("train_hf.py", *ARGS, "--accumulate", "2", "--bf16")
    proc = check("--resume-at", "11", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 3 runs x 16 steps bitwise identical" in proc.stdout


# -- in process ---------------------------------------------------------------------------


class _Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((2,), float(i)), "labels": torch.tensor(i % 2)}


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.cross_entropy(self.layer(x), labels)}


@pytest.fixture
def make_trainer(monkeypatch, tmp_path):
    for name in (
        "TORCHREPRO_SEED",
        "TORCHREPRO_CHECKPOINT",
        "TORCHREPRO_STOP_AT",
        "TORCHREPRO_TRACE",
    ):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores it, whoever sets it
        monkeypatch.delenv(name)
    made: list[Any] = []

    def make(dataset: Any = None, **overrides: Any) -> ReproTrainer:
        overrides = {
            "per_device_train_batch_size": 2,
            "save_strategy": "no",
            "logging_strategy": "no",
            **overrides,
        }
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            num_train_epochs=1,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            **overrides,
        )
        settings = torchrepro.deterministic("strict")  # then ReproTrainer changes nothing more
        made.append(settings)
        torch.manual_seed(0)  # the same initial weights in every trainer of a test
        return ReproTrainer(
            model=_Model(), args=args, train_dataset=dataset or _Pairs(), trace=False
        )

    yield make
    for settings in made:
        settings.restore()


@pytest.mark.rng_changes
def test_training_loader_is_torchrepros_and_ignore_data_skip_is_set(make_trainer):
    trainer = make_trainer(dataloader_drop_last=True)
    loader = trainer.get_train_dataloader()
    assert isinstance(loader, torchrepro.DataLoader)
    assert trainer.args.ignore_data_skip is True
    assert len(loader) == 6
    assert set(next(iter(loader))) == {"x", "labels"}


@pytest.mark.rng_changes
def test_samplers_the_loader_cannot_take_are_refused(make_trainer):
    trainer = make_trainer(train_sampling_strategy="group_by_length")
    with pytest.raises(
        torchrepro.TorchreproError, match="train_sampling_strategy='group_by_length'"
    ):
        trainer.get_train_dataloader()


@pytest.mark.rng_changes
def test_checkpoint_not_saved_by_reprotrainer_is_refused(make_trainer, tmp_path):
    foreign = tmp_path / "out" / "checkpoint-3"
    foreign.mkdir(parents=True)
    trainer = make_trainer()
    trainer.get_train_dataloader()
    trainer._repro_resume = str(foreign)
    with pytest.raises(torchrepro.TorchreproError, match="was not saved by ReproTrainer"):
        trainer._repro_load()


@pytest.mark.rng_changes
def test_mid_epoch_resume_with_a_partial_accumulation_group_is_refused(make_trainer, tmp_path):
    trainer = make_trainer(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    loader = trainer.get_train_dataloader()  # 3 batches per epoch: the last group is partial
    it = iter(loader)
    next(it)
    folder = tmp_path / "out" / "checkpoint-1"
    torchrepro.save_checkpoint(folder / "torchrepro.pt", loader=loader, extra={"global_step": 1})
    trainer.get_train_dataloader()
    trainer._repro_resume = str(folder)
    with pytest.raises(torchrepro.TorchreproError, match="gradient_accumulation_steps=2 and 3"):
        trainer._repro_load()


# -- IterableDataset and output_dir (issue 24) ---------------------------------------------


class _Stream(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
    """An endless stream with augmentation from the global RNG; it cannot say where it stands."""

    def __init__(self) -> None:
        self.i = 0

    def __iter__(self) -> Any:
        while True:
            i, self.i = self.i, self.i + 1
            x = torch.full((2,), float(i % 12)) + 0.1 * torch.randn(2)
            yield {"x": x, "labels": torch.tensor(i % 2)}


class _StatefulStream(_Stream):
    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


def _weights(trainer: ReproTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.xfail(
    strict=True,
    reason="open: passes on the frameworks branch, fails since the loader's pass semantics (issue 28: a pass given up is over) were merged with it; see the closing note",
)
@pytest.mark.rng_changes
def test_a_stateful_iterable_dataset_stops_and_resumes_bitwise(make_trainer, monkeypatch, tmp_path):
    whole = make_trainer(_StatefulStream(), max_steps=8)
    whole.train()
    monkeypatch.setenv("TORCHREPRO_CHECKPOINT", str(tmp_path / "ckpt.pt"))
    monkeypatch.setenv("TORCHREPRO_STOP_AT", "3")
    with pytest.raises(SystemExit):
        make_trainer(_StatefulStream(), max_steps=8).train()
    monkeypatch.delenv("TORCHREPRO_STOP_AT")
    resumed = make_trainer(_StatefulStream(), max_steps=8)
    resumed.train()
    assert resumed.state.global_step == 8
    after, before = _weights(resumed), _weights(whole)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


@pytest.mark.rng_changes
def test_an_iterable_dataset_without_state_is_refused_before_training(make_trainer, tmp_path):
    trainer = make_trainer(_Stream(), max_steps=4, save_strategy="steps", save_steps=2)
    with pytest.raises(
        torchrepro.TorchreproError, match=r"IterableDataset \(_Stream\).*save_strategy='steps'"
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not list(tmp_path.rglob("checkpoint-*"))


@pytest.mark.rng_changes
def test_an_iterable_dataset_without_state_trains_when_nothing_is_saved(make_trainer):
    trainer = make_trainer(_Stream(), max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.rng_changes
def test_under_check_each_run_writes_its_own_output_dir(make_trainer, monkeypatch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("TORCHREPRO_TRACE", str(run / "trace.jsonl"))
    trainer = make_trainer(max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    assert not (tmp_path / "out").exists()  # the script's own output_dir
    own = run / "trace.jsonl.transformers-output"
    assert sorted(p.name for p in own.iterdir()) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_check_of_a_script_that_resumes_from_its_fixed_output_dir(tmp_path):
    command = [sys.executable, str(SCRIPTS / "hf_fixed_output.py")]
    proc = check("--resume-at", "6", command=command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "REPRODUCIBLE: 3 runs x 16 steps bitwise identical" in proc.stdout
    assert not (tmp_path / "out").exists()
