"""FSDP2 (``fully_shard``) training under torchrun that resumes after a crash, a
preemption, or a change in the number of processes.

    torchrun --nproc-per-node=2 --max-restarts=3 examples/train_fsdp2.py --steps 200 --ckpt-dir ckpts/fsdp2

With ``--max-restarts``, torchrun's agent restarts the whole worker group when a
worker fails: a crash, or a SIGTERM, after which ``CheckpointManager`` saves
the step it reached and exits with 143. Every restart resumes from the newest
valid checkpoint. Relaunch with another ``--nproc-per-node`` and it resumes too:
each rank's parameter and optimizer shards are saved as DTensor shards and
loaded into the new sharding (each rank reads only the byte ranges it needs),
and the ``ResumableSampler`` continues the same global sample order (keep
``--global-batch`` divisible by every world size you use so that a step means
the same samples everywhere).

GPUs: NCCL, one per process (``LOCAL_RANK``); otherwise gloo on CPU
(``--device cpu`` forces it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

import shardckpt


def init_distributed(device_arg: str) -> torch.device:
    """Join the job torchrun started; return this process's device."""
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # One key space per restart attempt in torchrun's store: a restarted group must
    # never read the addresses the dead attempt published there.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return device


def make_data(n: int = 4096, d_in: int = 32, d_out: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    y = torch.tanh(x @ torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in))
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--ckpt-dir", default="ckpts/fsdp2")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=48, help="samples per step over all ranks")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = p.parse_args()
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} processes")
    batch = args.global_batch // world

    dataset = make_data()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 4)).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:  # one all-gather per layer, then the root for what is left
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # over the DTensor shards: sharded moments
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    sampler = shardckpt.ResumableSampler(dataset, shuffle=True, seed=0)  # rank/world from the process group
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True)
    state = shardckpt.TrainState(model=model, optimizer=opt, scheduler=sched, sampler=sampler)

    # Collective: every rank constructs the manager and calls restore/should_save/save/close.
    mgr = shardckpt.CheckpointManager(args.ckpt_dir, keep_last=3, save_interval_steps=args.save_every,
                                      async_save=True)
    mgr.install_signal_handlers()  # SIGTERM on any rank: all save at the next step, then exit 143
    step = last_saved = mgr.restore(state) or 0
    while step < args.steps:
        sampler.set_epoch(state.epoch)  # the restored epoch keeps its position
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            sampler.step(batch)  # batch samples on every rank are consumed only now
            step += 1
            if rank == 0 and step % 20 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if mgr.should_save(step):
                mgr.save(step, state, metrics={"loss": loss.item()})
                last_saved = step
            if step >= args.steps:
                break
        else:  # the epoch ran out: the next one starts from its beginning
            state.epoch += 1
    if last_saved != step:
        mgr.save(step, state, force=True)
    mgr.close()  # waits for the in-flight save
    if rank == 0:
        print(f"done: {step} steps at {world} processes, checkpoints in {args.ckpt_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    # exits 143 on preemption (torchrun restarts), even if gloo teardown would abort
    shardckpt.run_and_exit(main)
