"""The digits CNN of train_digits.py with the Hugging Face Trainer, bitwise reproducibly.

Plain ``transformers`` plus one swapped class (lines marked ``# torchrepro``); the model is
built in code, nothing is downloaded:

    torchrepro check --vary num_workers=0,2 --resume-at 21 -- python examples/train_hf.py

Under torchrun (gloo on CPU) each rank loads ``batch_size / world_size`` samples of every
global batch:

    torchrun --nproc-per-node 2 examples/train_hf.py
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import Digits, Net  # the dataset and model of the plain example

import torchrepro
from torchrepro.integrations.transformers import ReproTrainer


class DigitsDict(Digits):
    """The augmented digits as the dicts the Trainer passes to the model."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        image, label = super().__getitem__(index)
        return {"pixel_values": image, "labels": label}


class DigitsClassifier(torch.nn.Module):
    """The CNN, with the Trainer's calling convention: keyword inputs in, a dict with the loss out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, Any]:
        logits = self.net(pixel_values)
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch size")
    parser.add_argument("--limit", type=int, default=512, help="use the first N images only")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="TORCHREPRO_NUM_WORKERS overrides it"
    )
    parser.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="default: next to TORCHREPRO_CHECKPOINT, else ./hf-output",
    )
    parser.add_argument("--save-final", default=None, help="write the final weights here")
    args = parser.parse_args(argv)

    os.environ.setdefault("TORCHREPRO_SEED", "0")
    torchrepro.seed_everything()  # torchrepro: before the model, so it is built the same every run
    model = DigitsClassifier()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoint = os.environ.get("TORCHREPRO_CHECKPOINT")
    output_dir = args.output_dir or (checkpoint + ".hf" if checkpoint else "hf-output")
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size // world // args.accumulate,
        gradient_accumulation_steps=args.accumulate,
        num_train_epochs=args.epochs,
        learning_rate=3e-3,
        weight_decay=1e-2,
        dataloader_num_workers=args.num_workers,
        dataloader_drop_last=True,
        bf16=args.bf16,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = ReproTrainer(
        model=model, args=training_args, train_dataset=DigitsDict(args.limit)
    )  # torchrepro
    trainer.train()
    if args.save_final and trainer.is_world_process_zero():
        torch.save(model.state_dict(), args.save_final)
    if trainer.is_world_process_zero():
        print(f"steps {trainer.state.global_step}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # DDP
        # every rank finishes its work before any tears its connections down
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
