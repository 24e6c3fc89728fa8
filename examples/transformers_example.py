"""Hugging Face Transformers' Trainer with shardckpt checkpoints: the one line a
user changes is ``Trainer(`` -> ``ShardckptTrainer(``.

Runs anywhere, no downloads (a tiny GPT-2 built from its config):

    python examples/transformers_example.py --output-dir /tmp/tf_run
    torchrun --nproc-per-node=2 examples/transformers_example.py --output-dir /tmp/tf_run

Run it twice: the second run resumes from the newest checkpoint that verifies
(a checkpoint torn by a kill is skipped with a warning) and trains on.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import shardckpt
from shardckpt.transformers import ShardckptTrainer, latest


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, fixed by their index (a stand-in for a tokenized corpus)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--async-save", action="store_true")
    a = p.parse_args()

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(
        output_dir=a.output_dir, max_steps=a.max_steps, save_steps=2, save_total_limit=2,
        per_device_train_batch_size=4, logging_steps=2, report_to=[], use_cpu=True, ddp_backend="gloo",
        disable_tqdm=True,
    )
    trainer = ShardckptTrainer(model=model, args=args, train_dataset=Tokens(),  # was: Trainer(
                               async_save=a.async_save)
    resume = latest(a.output_dir) is not None  # or simply resume_from_checkpoint=True when one exists
    trainer.train(resume_from_checkpoint=resume or None)
    if trainer.args.process_index == 0:
        print(f"resumed from {trainer.resumed_from}" if trainer.resumed_from else "started from scratch")
        print("checkpoints:", sorted(n for n in os.listdir(a.output_dir) if n.startswith("checkpoint-")))
    trainer.save_model(os.path.join(a.output_dir, "final_model"))  # the usual HF files: from_pretrained works
    shardckpt.close()  # background saves finished, shardckpt's threads stopped


if __name__ == "__main__":
    main()
