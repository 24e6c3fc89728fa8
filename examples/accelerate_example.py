"""Accelerate training with shardckpt checkpoints: the two lines that change are marked.

    torchrun --nproc-per-node=2 examples/accelerate_example.py --project runs/acc
    torchrun --nproc-per-node=2 examples/accelerate_example.py --project runs/acc   # resumes

A tiny causal-LM-like model built from a config (no downloads), AdamW, a linear
warm-up schedule, a shuffling seedable DataLoader. Checkpoints go to
``<project>/checkpoints/checkpoint_<i>`` (Accelerate's automatic naming, ``total_limit=3``);
a rerun resumes from the newest *valid* one (a checkpoint a kill left torn is skipped
with a warning). ``--async`` saves in the background; ``--fsdp2`` shards the model with
Accelerate's FSDP plugin version 2 (GPU only: on CPU Accelerate runs DDP).
``--check-resume`` trains, then runs a second phase in the same processes that resumes
from the last checkpoint and checks the parameters came back bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset

import shardckpt.accelerate as sca  # (1) shardckpt's drop-ins


@dataclass
class TinyConfig:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    seq: int = 32


class TinyLM(torch.nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(cfg.dim), torch.nn.Linear(cfg.dim, 4 * cfg.dim), torch.nn.GELU(),
                                torch.nn.Linear(4 * cfg.dim, cfg.dim)) for _ in range(cfg.layers))
        self.head = torch.nn.Linear(cfg.dim, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2) if args.fsdp2 else None
    return Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=fsdp,
                       project_config=ProjectConfiguration(project_dir=args.project, automatic_checkpoint_naming=True,
                                                           total_limit=3),
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def setup(acc: Accelerator, cfg: TinyConfig):
    set_seed(0)
    ids = torch.randint(0, cfg.vocab, (256, cfg.seq + 1), generator=torch.Generator().manual_seed(0))
    dl = DataLoader(TensorDataset(ids), batch_size=8, shuffle=True)
    model = TinyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return acc.prepare(model, opt, sched, dl)


class Progress:
    """The training position, checkpointed with everything else (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.step = int(sd["step"])


def train(acc: Accelerator, args: argparse.Namespace, cfg: TinyConfig, progress: Progress) -> dict[str, torch.Tensor]:
    model, opt, sched, dl = setup(acc, cfg)
    progress.step = 0
    if os.path.isdir(os.path.join(args.project, "checkpoints")):
        path = sca.load_state(acc)  # (2) was: acc.load_state(); picks the newest *valid* checkpoint
        acc.print(f"resumed from {path} at step {progress.step}")
    while progress.step < args.steps:
        epoch, skip = divmod(progress.step, len(dl))
        dl.set_epoch(epoch)
        for (ids,) in acc.skip_first_batches(dl, skip) if skip else dl:
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            progress.step += 1
            if progress.step % args.save_every == 0:
                path = sca.save_state(acc, async_save=args.async_save)  # (3) was: acc.save_state()
                acc.print(f"step {progress.step} loss {loss.item():.4f} saved {path}")
            if progress.step >= args.steps:
                break
    sca.wait(acc)  # the last async save is committed (acc.end_training() would wait too)
    return {k: v.detach().clone() for k, v in acc.get_state_dict(model).items()}  # full weights (FSDP2: gathered)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--project", default="runs/accelerate_example")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-every", type=int, default=8)
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--fsdp2", action="store_true")
    p.add_argument("--check-resume", action="store_true")
    args = p.parse_args()
    cfg = TinyConfig()
    acc = make_accelerator(args)
    acc.print(f"{acc.num_processes} processes, {acc.distributed_type}, fsdp2={acc.is_fsdp2}")
    progress = Progress()
    acc.register_for_checkpointing(progress)
    trained = train(acc, args, cfg, progress)
    if args.check_resume:
        acc.free_memory()
        resumed = train(acc, args, cfg, progress)  # finds the last checkpoint, restores it, has nothing left to train
        same = all(torch.equal(trained[k], resumed[k]) for k in trained)
        acc.print(f"parameters after resume identical: {same}")
    else:
        same = True
    acc.end_training()  # waits for an async save still in flight, then destroys the process group
    # Exit before the DDP module is freed: it still holds the gloo group end_training destroyed,
    # whose destructor can deadlock against the GIL (a torch/gloo issue seen on CPU, not shardckpt's).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if same else 1)


if __name__ == "__main__":
    main()
