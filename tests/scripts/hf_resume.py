"""Mid-epoch resume in the Hugging Face Trainer with and without ReproTrainer; prints JSON.

Plain: ``transformers.set_seed``, the Trainer's own loader, a checkpoint at step ``STOP``
(``save_steps``), resumed with ``train(resume_from_checkpoint=...)``. Repro: the same with
``ReproTrainer`` (and the resumed half with 2 workers instead of 0). Also the plain Trainer
with 0 and with 2 workers, uninterrupted.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import torchrepro
from torchrepro.data import _streams
from torchrepro.integrations.transformers import ReproTrainer

STOP = 5  # of 16 steps: mid-epoch (8 batches per epoch)


class Noisy(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i] + 0.1 * torch.randn(4), "labels": self.y[i]}  # global RNG


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


class StopAt(TrainerCallback):  # type: ignore[misc]
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == STOP:
            control.should_save = True
            control.should_training_stop = True


def train(
    out: str, repro: bool, workers: int, stop: bool = False, resume: str | None = None
) -> Any:
    _streams.reset_created()  # a fresh process: loaders are keyed by creation order
    if repro:
        torchrepro.seed_everything(0)
    else:
        set_seed(0)
    model = Model()
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        dataloader_num_workers=workers,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    cls = ReproTrainer if repro else Trainer
    trainer = cls(
        model=model, args=args, train_dataset=Noisy(), callbacks=[StopAt()] if stop else None
    )
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.clone() for k, v in model.state_dict().items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def main() -> None:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, repro, resumed_workers in (("plain", False, 0), ("repro", True, 2)):
            whole = train(f"{tmp}/{name}-whole", repro, 0)
            train(f"{tmp}/{name}", repro, 0, stop=True)
            resumed = train(
                f"{tmp}/{name}", repro, resumed_workers, resume=f"{tmp}/{name}/checkpoint-{STOP}"
            )
            result[name] = differing(whole, resumed)
            result["tensors"] = len(whole)
            if not repro:
                result["plain_workers"] = differing(whole, train(f"{tmp}/w", False, 2))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
