"""Benchmark worker: time an MMEngine run spends checkpointing, with its own ``Runner`` +
``CheckpointHook`` (``torch.save`` of a ``.pth`` on rank 0, "native") or
``ShardckptRunner`` + ``ShardckptCheckpointHook`` ("sync").

``measure`` runs inside each torchrun process (torchrun's environment set). The hook
offers no async save yet, so "async" is refused (ValueError) rather than timed as sync;
``bench_integrations`` needs all three variants, so mmengine is not in its default list.
By hand::

    torchrun --nproc-per-node=2 benchmarks/integrations_mmengine.py --variant sync --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

__all__ = ["measure", "VARIANTS"]

VARIANTS = ("native", "sync")


def _config(variant: str, out_dir: str, steps: int, interval: int, width: int) -> dict:
    distributed = "WORLD_SIZE" in os.environ
    hook = "CheckpointHook" if variant == "native" else "ShardckptCheckpointHook"
    cfg = dict(
        model=dict(type="BenchNet", width=width), work_dir=os.path.join(out_dir, variant),
        train_dataloader=dict(dataset=dict(type="BenchData", width=width), batch_size=8, num_workers=0,
                              sampler=dict(type="DefaultSampler", shuffle=False),
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=steps),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-4)),
        default_hooks=dict(checkpoint=dict(type=hook, interval=interval, by_epoch=False), logger=None),
        randomness=dict(seed=0), launcher="pytorch" if distributed else "none", log_level="WARNING",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo")))
    if variant == "native" and distributed and not torch.cuda.is_available():
        cfg.update(model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None))
    return cfg


def _register() -> None:
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, MODELS
    from torch.utils.data import Dataset

    @MODELS.register_module(force=True)
    class BenchNet(BaseModel):
        # 4 square layers: 4·width² parameters, ×3 with AdamW's moments (width 1024: ~50 MB)
        def __init__(self, width: int) -> None:
            super().__init__()
            layers: list[torch.nn.Module] = []
            for _ in range(4):
                layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
            self.net = torch.nn.Sequential(*layers)

        def forward(self, inputs, mode="tensor"):
            out = self.net(inputs)
            return {"loss": out.square().mean()} if mode == "loss" else out

    @DATASETS.register_module(force=True)
    class BenchData(Dataset):
        def __init__(self, width: int) -> None:
            self.x = torch.randn(64, width, generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"inputs": self.x[i]}


def measure(variant: str, out_dir: str, steps: int, interval: int, width: int) -> float:
    """Train ``steps`` iterations with a checkpoint every ``interval``; return the seconds
    this rank spent inside the checkpoint hook's saves."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r} (no async save in the hook yet)")
    import torch.distributed as dist
    from mmengine.config import Config
    from mmengine.runner import Runner

    import shardckpt.mmengine  # noqa: F401 - registers the runner and the hook
    from shardckpt.mmengine import ShardckptRunner

    _register()
    cfg = _config(variant, out_dir, steps, interval, width)
    if variant == "native" and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    runner = (Runner if variant == "native" else ShardckptRunner).from_cfg(Config(cfg))
    hook = next(h for h in runner.hooks if type(h).__name__.endswith("CheckpointHook"))
    spent = [0.0]
    inner = hook._save_checkpoint

    def timed(r):
        t0 = time.perf_counter()
        inner(r)
        if dist.is_initialized():
            dist.barrier()  # the checkpoint exists for every rank only once all are done
        spent[0] += time.perf_counter() - t0

    hook._save_checkpoint = timed
    runner.train()
    return spent[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--width", type=int, default=1024)
    a = p.parse_args()
    seconds = measure(a.variant, a.out, a.steps, a.interval, a.width)
    print(json.dumps({"variant": a.variant, "rank": int(os.environ.get("RANK", "0")), "seconds": seconds}))
    sys.stdout.flush()
    os._exit(0)  # skip finalization: freeing DDP's gloo group at exit can deadlock (torch, CPU)


if __name__ == "__main__":
    main()
