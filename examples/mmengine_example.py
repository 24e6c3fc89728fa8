"""MMEngine with shardckpt checkpoints: the config lines of docs/INTEGRATIONS.md, a tiny
model, CPU or GPU, one process or many (``launcher="pytorch"`` under torchrun).

    python examples/mmengine_example.py --work-dir work_dirs/demo
    torchrun --nproc-per-node=2 examples/mmengine_example.py --work-dir work_dirs/demo
    # run it again with --resume: it continues from the newest *valid* checkpoint
    torchrun --nproc-per-node=2 examples/mmengine_example.py --work-dir work_dirs/demo --resume --iters 12
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS, RUNNERS
from mmengine.utils import import_modules_from_strings
from torch.utils.data import Dataset


@MODELS.register_module()
class ExampleNet(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def forward(self, inputs, targets, mode="tensor"):
        out = self.net(inputs)
        return {"loss": F.mse_loss(out, targets)} if mode == "loss" else out


@DATASETS.register_module()
class ExampleData(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "targets": self.y[i]}


def build_config(work_dir: str, iters: int, resume: bool) -> Config:
    return Config(dict(
        # --- the shardckpt lines -------------------------------------------------------
        custom_imports=dict(imports=["shardckpt.mmengine"], allow_failed_imports=False),
        runner_type="ShardckptRunner",
        default_hooks=dict(checkpoint=dict(type="ShardckptCheckpointHook", interval=4, by_epoch=False,
                                           max_keep_ckpts=3, save_last=True)),
        resume=resume,
        # --- an ordinary MMEngine config ---------------------------------------------------
        model=dict(type="ExampleNet"), work_dir=work_dir,
        train_dataloader=dict(dataset=dict(type="ExampleData"), sampler=dict(type="DefaultSampler", shuffle=True),
                              batch_size=8, num_workers=0, collate_fn=dict(type="default_collate")),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-3)),
        param_scheduler=[dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=4)],
        custom_hooks=[dict(type="EMAHook")],
        randomness=dict(seed=0),
        launcher="pytorch" if "WORLD_SIZE" in os.environ else "none",
        env_cfg=dict(dist_cfg=dict(backend="nccl" if torch.cuda.is_available() else "gloo")),
    ))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work-dir", default="work_dirs/shardckpt_example")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    cfg = build_config(a.work_dir, a.iters, a.resume)
    import_modules_from_strings(**cfg["custom_imports"])  # what Config.fromfile does for a config file
    runner = RUNNERS.build(cfg)
    runner.train()
    if runner.rank == 0:
        print(f"trained to iteration {runner.iter}; checkpoints under {a.work_dir}: "
              f"{sorted(n for n in os.listdir(a.work_dir) if n.startswith('iter_'))}")


if __name__ == "__main__":
    main()
