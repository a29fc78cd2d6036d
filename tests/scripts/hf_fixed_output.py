"""A script in the style of HF's run_glue.py: a fixed output_dir, resumed from its last checkpoint.

``python hf_fixed_output.py`` trains 16 steps into ``./out``, saving every 4 steps, and, as
run_glue does, resumes from the last checkpoint it finds there. Under ``torchrepro check``
each run must start afresh (or from its own stop), never from another run's checkpoint.
"""

from __future__ import annotations

import os
import sys

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import torchrepro
from torchrepro.integrations.transformers import ReproTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_resume import Model, Noisy


def main() -> None:
    args = TrainingArguments(
        output_dir="out",
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=0.1,
        optim="sgd",
        save_strategy="steps",
        save_steps=4,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    torchrepro.seed_everything(0)
    trainer = ReproTrainer(model=Model(), args=args, train_dataset=Noisy())
    trainer.train(resume_from_checkpoint=last)


if __name__ == "__main__":
    main()
