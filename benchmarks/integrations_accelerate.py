"""Benchmark worker: time an Accelerate run spends checkpointing, with its own
``accelerator.save_state`` ("native") or shardckpt's drop-in ("sync", "async").

``measure`` runs inside each torchrun process (torch.distributed not yet initialised;
torchrun's environment set). ``benchmarks/bench_integrations.py`` launches it, interleaves
variants and takes medians. By hand, one round::

    python benchmarks/bench_integrations.py --trainers accelerate --repeats 1
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["measure", "VARIANTS"]

VARIANTS = ("native", "sync", "async")


def _model(width: int) -> torch.nn.Module:
    # 4 square layers: 4·width² parameters, ×3 with AdamW's two moments (width 1024: ~50 MB of state)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def measure(variant: str, out_dir: str, steps: int, interval: int, width: int) -> float:
    """Train ``steps`` steps of a ``width``-wide MLP with a checkpoint every ``interval``
    steps under ``out_dir``; return the seconds this rank spent inside the save calls (for
    "async" also the final wait for the last commit)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import shardckpt.accelerate as sca

    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)
    model = _model(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    model, opt, sched = acc.prepare(model, opt, sched)
    batch = torch.randn(8, width, device=acc.device)
    spent = 0.0
    for step in range(1, steps + 1):
        loss = model(batch).square().mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % interval:
            continue
        path = os.path.join(out_dir, variant, f"step_{step}")
        t0 = time.perf_counter()
        if variant == "native":
            acc.save_state(path)
        else:
            sca.save_state(acc, path, async_save=variant == "async")
        spent += time.perf_counter() - t0
    if variant == "async":
        t0 = time.perf_counter()
        sca.wait(acc)  # the run's end: the last checkpoint committed
        spent += time.perf_counter() - t0
    return spent
