"""A plain single-device training loop (no torch.distributed) that survives a
power cut: everything a resumed run needs is one ``TrainState``, and a
``CheckpointManager`` resumes from the newest checkpoint that is really valid.

    python examples/train_single.py --steps 200 --ckpt-dir ckpts/single
    # kill it (Ctrl-C, kill -9, power cut), run the same command again: it resumes.
    # kill -TERM <pid>: it saves the step it reached, then exits with code 143.

Runs on CPU or one GPU (``--device auto`` picks CUDA when present; mixed
precision with a ``GradScaler`` on CUDA).
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from torch.utils.data import DataLoader, TensorDataset

import shardckpt


def make_data(n: int = 2048, d_in: int = 32, d_out: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    y = torch.tanh(x @ torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in))
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--ckpt-dir", default="ckpts/single")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows what restore decided
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)

    dataset = make_data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 4)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    # Without torch.distributed the sampler is a resumable shuffling sampler over one "rank".
    sampler = shardckpt.ResumableSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    state = shardckpt.TrainState(model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                                 sampler=sampler, extra={"best_loss": None})

    with shardckpt.CheckpointManager(args.ckpt_dir, keep_last=2, save_interval_steps=args.save_every,
                                     async_save=True) as mgr:
        mgr.install_signal_handlers()  # SIGTERM: save at the next step boundary, exit 143
        step = last_saved = mgr.restore(state) or 0  # step N = N optimizer steps done; None: fresh
        while step < args.steps:
            sampler.set_epoch(state.epoch)  # the restored epoch keeps its position
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    loss = torch.nn.functional.mse_loss(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                sampler.step(args.batch_size)  # these samples are consumed only now
                step += 1
                best = state.extra["best_loss"]
                state.extra["best_loss"] = loss.item() if best is None else min(best, loss.item())
                if step % 20 == 0:
                    print(f"step {step} loss {loss.item():.4f}", flush=True)
                if mgr.should_save(step):
                    mgr.save(step, state, metrics={"loss": loss.item()})
                    last_saved = step
                if step >= args.steps:
                    break
            else:  # the epoch ran out: the next one starts from its beginning
                state.epoch += 1
        if last_saved != step:
            mgr.save(step, state, force=True)  # the final state
    print(f"done: {step} steps, best loss {state.extra['best_loss']:.4f}, checkpoints in {args.ckpt_dir}")


if __name__ == "__main__":
    main()
