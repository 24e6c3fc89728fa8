"""One MMEngine training run (started by torchrun, gloo on CPU, or as a single process)
for tests/integrations/test_mmengine_checkpoints.py: a tiny MLP, ``--iters`` iterations,
a checkpoint every ``--interval``, AdamW, a MultiStepLR schedule and an EMAHook, built
from a config the way MMEngine's tools/train.py builds it (``RUNNERS.build``).

``--native``: MMEngine's own ``Runner`` + ``CheckpointHook`` (``.pth`` files); the CPU
process group and the CPU DDP wrapper (``device_ids=None``) are set up here, as a CPU
user of MMEngine must. Otherwise the config lines of the issue: ``ShardckptRunner`` +
``ShardckptCheckpointHook``.

Test hook, on shardckpt's own internals: ``SLOW_SAVE_AT=<iter>`` makes the save at that
iteration block in its writes (the test SIGKILLs the run while the checkpoint is torn).

Each rank writes ``<out>/rank<r>.pt``: the final model and optimizer state, iteration,
the iteration training started at, and the EMA model's state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.registry import DATASETS, HOOKS, MODELS, RUNNERS
from mmengine.runner import Runner
from mmengine.utils import import_modules_from_strings
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from shardckpt.io.save_target import SaveTarget  # noqa: E402

_hold = {"slow": False}
_real_write = SaveTarget.write_items


def _patched_write(self, *a, **kw):
    if _hold["slow"]:
        time.sleep(600)  # the test SIGKILLs the job while this save is torn
    return _real_write(self, *a, **kw)


SaveTarget.write_items = _patched_write


@MODELS.register_module()
class TinyNet(BaseModel):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def forward(self, inputs, targets, mode="tensor"):
        out = self.net(inputs)
        return {"loss": F.mse_loss(out, targets)} if mode == "loss" else out


@DATASETS.register_module()
class TinyData(Dataset):
    metainfo = {"classes": ("y",)}

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(96, 8, generator=g), torch.randn(96, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "targets": self.y[i]}


@HOOKS.register_module()
class SlowSaveHook(Hook):
    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        _hold["slow"] = runner.iter + 1 == int(os.environ.get("SLOW_SAVE_AT", "-1"))

    def before_train(self, runner) -> None:
        runner.message_hub.update_info("started_at", runner.iter)


def config(a: argparse.Namespace) -> Config:
    distributed = "WORLD_SIZE" in os.environ
    hook = "CheckpointHook" if a.native else "ShardckptCheckpointHook"
    cfg = dict(
        model=dict(type="TinyNet", width=a.width), work_dir=a.work_dir,
        train_dataloader=dict(dataset=dict(type="TinyData"), sampler=dict(type="DefaultSampler", shuffle=True),
                              batch_size=4, num_workers=0, collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=a.iters, val_interval=10**6),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
        param_scheduler=[dict(type="MultiStepLR", by_epoch=False, milestones=[3, 6], gamma=0.5)],
        default_hooks=dict(checkpoint=dict(type=hook, interval=a.interval, by_epoch=False, max_keep_ckpts=3)),
        custom_hooks=[dict(type="EMAHook"), dict(type="SlowSaveHook")],
        randomness=dict(seed=0), launcher="pytorch" if distributed else "none",
        env_cfg=dict(dist_cfg=dict(backend="gloo")), log_level="WARNING",
        resume=a.resume, load_from=a.load_from,
    )
    if not a.native:  # the adoption lines of the issue
        cfg.update(custom_imports=dict(imports=["shardckpt.mmengine"], allow_failed_imports=False),
                   runner_type="ShardckptRunner")
    elif distributed:  # what a CPU user of MMEngine's own runner writes
        cfg.update(model_wrapper_cfg=dict(type="MMDistributedDataParallel", device_ids=None))
    return Config(cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--native", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--load-from", default=None)
    a = p.parse_args()
    cfg = config(a)
    if a.native and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")  # MMEngine's init_dist calls torch.cuda.set_device
    if "custom_imports" in cfg:
        import_modules_from_strings(**cfg["custom_imports"])
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    ema = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"model": model.state_dict(), "opt": runner.optim_wrapper.optimizer.state_dict(),
                "iter": runner.iter, "started_at": runner.message_hub.get_info("started_at"),
                "ema": ema.ema_model.module.state_dict()}, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
    # Skip interpreter finalization, as the other integration workers do (a gloo/C++
    # destructor race at exit can abort a finished run); the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
