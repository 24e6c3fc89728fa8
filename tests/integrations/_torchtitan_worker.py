"""One torchtitan training run under torchrun (gloo, CPU): torchtitan's llama3 model
(2 layers) sharded with FSDP2, its ``OptimizersContainer`` (AdamW, for-loop) and
``LRSchedulersContainer``, its ``ParallelAwareDataloader`` (per-rank state) and a
train state, driven the way ``Trainer.train`` drives them (``load`` once, ``save``
after every step) without the trainer, whose ``__init__`` needs CUDA.

The loss is a data-dependent function of every parameter rather than the model's
forward: FlexAttention has no backward on CPU and the varlen backend is CUDA-only.
What is checkpointed (DTensor parameters, optimizer and scheduler state, loader
positions) is what the trainer checkpoints.

``--manager native`` uses torchtitan's own ``CheckpointManager`` (DCP).
Test hook on shardckpt's own internals: ``SLOW_SAVE_AT=<step>`` blocks that save's
writes (the test kills the job meanwhile). Rank 0 writes ``final.pt`` (full
parameters, step); every rank writes ``error<r>.json`` when a shardckpt error stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import IterableDataset
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.models.llama3 import model_registry

import shardckpt.torchtitan as sct
from shardckpt.errors import ShardckptError
from shardckpt.io.save_target import SaveTarget

_slow = {"on": False}
_real_write = SaveTarget.write_items


def _patched_write(self, *a, **kw):
    if _slow["on"]:
        time.sleep(600)  # the test SIGKILLs the job while this save is torn
    return _real_write(self, *a, **kw)


SaveTarget.write_items = _patched_write


class Tokens(IterableDataset):
    """Endless deterministic token rows, different per rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self):
        i = 0
        while True:
            g = torch.Generator().manual_seed(1000 * self.rank + i)
            yield torch.randint(0, 2048, (16,), generator=g)
            i += 1


class TrainState(Stateful):
    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.ntokens_seen = int(sd["step"]), int(sd["ntokens_seen"])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--manager", choices=["ours", "native"], default="ours")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--async-mode", default="disabled")
    p.add_argument("--load-step", type=int, default=-1)
    p.add_argument("--keep", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--initial-load-path", default=None)
    return p.parse_args()


def build(args: argparse.Namespace):
    cfg = model_registry("debugmodel").model
    cfg.layers = cfg.layers[:2]
    if args.dim != 64:  # another model: the head's width differs
        cfg.lm_head.in_features = args.dim
    torch.manual_seed(0)
    model = cfg.build()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    oc = default_adamw(lr=1e-2)
    oc.implementation = "for-loop"  # the fused one is CUDA-only
    opt = oc.build(model_parts=[model])
    sched = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=opt, training_steps=args.steps)
    loader = ParallelAwareDataloader(Tokens(dist.get_rank()), dist.get_rank(), dist.get_world_size(), batch_size=2)
    return model, opt, sched, loader


def manager_config(args: argparse.Namespace):
    kw = dict(enable=True, folder="checkpoint", interval=args.interval, async_mode=args.async_mode,
              keep_latest_k=args.keep, load_step=args.load_step, last_save_model_only=False,
              exclude_from_loading=list(args.exclude), initial_load_path=args.initial_load_path,
              initial_load_model_only=args.initial_load_path is not None)
    if args.manager == "native":
        return CheckpointManager.Config(**kw)
    return sct.shardckpt_config(None, **kw)


def train(args, model, opt, sched, loader, ckpt, state) -> None:
    ckpt.load(step=args.load_step)
    print(f"rank{dist.get_rank()} resumed at step {state.step}", flush=True)
    batches = iter(loader)
    while state.step < args.steps:
        state.step += 1
        batch = next(batches)
        state.ntokens_seen += batch.numel()
        c = batch.float().mean() / 2048.0
        loss = sum(((p - c) ** 2).mean() for p in model.parameters())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        _slow["on"] = str(state.step) == os.environ.get("SLOW_SAVE_AT")
        ckpt.save(state.step, last_step=state.step == args.steps)
    ckpt.maybe_wait_for_saving()


def main() -> int:
    args = parse()
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, opt, sched, loader = build(args)
    state = TrainState()
    ckpt = manager_config(args).build(dataloader=loader, model_parts=[model], optimizers=opt,
                                      lr_schedulers=sched, states={"train_state": state}, sd_adapter=None,
                                      base_folder=args.root)
    try:
        train(args, model, opt, sched, loader, ckpt, state)
    except ShardckptError as e:
        (out / f"error{rank}.json").write_text(json.dumps({
            "type": type(e).__name__, "path": getattr(e, "path", None), "key": getattr(e, "key", None),
            "message": str(e)}))
        return 3
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"params": params, "step": state.step, "ntokens": state.ntokens_seen,
                    "lr": sched.schedulers[0].get_last_lr()}, out / "final.pt")
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalization, as tests/multiproc.py does: a gloo/C++ destructor
    # race at exit ("terminate called without an active exception") aborted a finished
    # 3-process run in CI; the results are written by then.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
