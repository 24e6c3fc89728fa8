"""Phase T of ``bench_async.py`` (rank side): a DDP training loop that checkpoints.

An MLP (``D_IN -> HIDDEN -> HIDDEN -> HIDDEN -> D_IN``, fused Adam) under DDP on
2 gloo ranks checkpoints ``get_state_dict(model, optim)`` every ``--every`` steps,
for each of ``T_CONFIGS``. Two schedules (``--train-mode``): ``windows`` interleaves
single checkpoint intervals of the configs, ``runs`` whole runs of ``--steps``
steps; ``bench_async.py``'s docstring says what each times and why.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks._async import BATCH, D_IN, HIDDEN, T_CONFIGS, MiB
from benchmarks._common import med, rank0_logger, rotated

__all__ = ["phase_t"]


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


class _Trainer:
    """The model, its optimizer and batches, and checkpointing as a training loop does it."""

    def __init__(self, root: str, dcp_pg: Any) -> None:
        import torch
        import torch.distributed as dist
        from torch import nn
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.root, self.dcp_pg, self.seq = root, dcp_pg, 0
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(D_IN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, D_IN),
        )
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ddp = DDP(model)
        # foreach Adam: ~8x slower here
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator().manual_seed(1000 + dist.get_rank())
        self.batches = [
            (torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_IN, generator=g))
            for _ in range(4)
        ]

    def step(self, s: int) -> None:
        import torch.nn.functional as F

        x, y = self.batches[s % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        F.mse_loss(self.ddp(x), y).backward()
        self.opt.step()

    def state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.ddp, self.opt)
        return {"model": msd, "optim": osd}

    def ckpt_bytes(self) -> int:
        import torch

        return sum(v.numel() * v.element_size() for part in self.state().values()
                   for v in _leaves(part) if isinstance(v, torch.Tensor))  # fmt: skip

    def checkpoint(self, cfg: str, pending: Any, tag: str) -> Any:
        """Start (or do) one checkpoint as the training loop would; returns the new pending handle."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        import shardckpt

        self.seq += 1
        path = os.path.join(self.root, f"T-{cfg}-{tag}-{self.seq}")
        sd = self.state()
        if cfg == "shardckpt-async":
            return shardckpt.async_save(sd, path)  # waits for the previous save itself
        if cfg == "shardckpt-sync":
            shardckpt.save(sd, path)
            return None
        if cfg == "dcp-async":
            if pending is not None:
                pending.result()
            r = dcp.async_save(
                sd, storage_writer=FileSystemWriter(path, sync_files=True), process_group=self.dcp_pg
            )
            return getattr(r, "upload_completion", r)
        raise ValueError(cfg)

    def clean(self, cfg: str) -> None:
        """After a config's run or window: its checkpoints go (rank 0), dirty pages are flushed."""
        import torch.distributed as dist

        dist.barrier()
        if dist.get_rank() == 0:
            for d in os.listdir(self.root):
                if d.startswith(f"T-{cfg}-"):
                    shutil.rmtree(os.path.join(self.root, d), ignore_errors=True)
            os.sync()


def _one_run(args: argparse.Namespace, tr: _Trainer, cfg: str, rnd: int) -> dict[str, Any]:
    """``--steps`` steps of ``cfg``, a checkpoint every ``--every``, a priming one before."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    pending = None
    if cfg != "none":  # priming checkpoint: its write overlaps the first window
        pending = tr.checkpoint(cfg, None, f"r{rnd}")
    step_t: list[float] = []
    ckpt_t: list[float] = []
    t0 = time.perf_counter()
    for s in range(1, args.steps + 1):
        ts = time.perf_counter()
        tr.step(s)
        if cfg != "none" and s % args.every == 0:
            tc = time.perf_counter()
            pending = tr.checkpoint(cfg, pending, f"r{rnd}")
            ckpt_t.append(time.perf_counter() - tc)
        step_t.append(time.perf_counter() - ts)
    loop = time.perf_counter() - t0
    tw = time.perf_counter()
    if pending is not None:
        pending.result()
    final_wait = time.perf_counter() - tw
    ckpt_steps = {s for s in range(1, args.steps + 1) if cfg != "none" and s % args.every == 0}
    plain = [t for s, t in zip(range(1, args.steps + 1), step_t) if s not in ckpt_steps]
    return {"cfg": cfg, "round": rnd, "loop": loop, "mean_step": loop / args.steps,
            "plain_step": statistics.mean(plain), "ckpt_calls": ckpt_t, "final_wait": final_wait}  # fmt: skip


def _train_runs(args: argparse.Namespace, tr: _Trainer,
                log: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """Whole runs of the configs, interleaved, the order rotated per round."""
    runs: list[dict[str, Any]] = []
    for rnd in range(args.train_rounds):
        for cfg in rotated(T_CONFIGS, rnd):
            run = _one_run(args, tr, cfg, rnd)
            runs.append(run)
            tr.clean(cfg)
            log(
                f"round {rnd} {cfg:16s} mean step {run['loop'] / args.steps * 1e3:7.1f} ms  (steps without a save "
                f"{run['plain_step'] * 1e3:7.1f} ms; save calls "
                + (" ".join(f"{t:.2f}" for t in run["ckpt_calls"]) or "-")
                + f" s; final wait {run['final_wait']:.2f}s)"
            )
    return runs


def _train_windows(args: argparse.Namespace, tr: _Trainer,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """Checkpoint intervals of the configs interleaved round-robin (order rotated).

    A window is one checkpoint interval as a long run sees it: the checkpoint
    call, ``--every`` training steps (which the background write overlaps),
    then the wait for that save to finish -- exactly what the next checkpoint
    call of a continuous run would wait for (nothing, if the write fits in the
    interval). All three are timed. Interleaving whole intervals makes the
    configs see the same background load on a shared machine.
    """
    import torch.distributed as dist

    n_win = max(1, args.steps // args.every) * args.train_rounds
    wins: list[dict[str, Any]] = []
    step = 0
    for j in range(n_win):
        for cfg in rotated(T_CONFIGS, j):
            dist.barrier()
            t0 = time.perf_counter()
            pending = tr.checkpoint(cfg, None, f"w{j}") if cfg != "none" else None
            t1 = time.perf_counter()
            for _ in range(args.every):
                step += 1
                tr.step(step)
            t2 = time.perf_counter()
            if pending is not None:
                pending.result()
            t3 = time.perf_counter()
            wins.append({"cfg": cfg, "win": j, "call": t1 - t0, "steps": t2 - t1, "wait": t3 - t2,
                         "total": t3 - t0})  # fmt: skip
            tr.clean(cfg)
        if j % 3 == 2 or j == n_win - 1:
            recent = [w for w in wins if w["win"] > j - 3]
            log(
                f"windows {max(0, j - 2)}-{j}: "
                + "  ".join(
                    f"{c} {med([w['total'] for w in recent if w['cfg'] == c]) / args.every * 1e3:.0f}"
                    for c in T_CONFIGS
                )
                + " ms/step"
            )
    return wins


def phase_t(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then the configs under ``--train-mode``; this rank's windows or runs."""
    import torch.distributed as dist

    import shardckpt

    world = dist.get_world_size()
    dcp_pg = dist.new_group(backend="gloo")
    log = rank0_logger(f"phase T | {world} ranks")
    tr = _Trainer(args.dir, dcp_pg)
    for s in range(3):  # warm-up; creates Adam's state before any checkpoint
        tr.step(s)
    ckpt_bytes = tr.ckpt_bytes()
    log(f"MLP {tr.n_params / 1e6:.1f}M params, checkpoint {ckpt_bytes / MiB:.0f} MiB (model + Adam), batch {BATCH}")
    if args.train_mode == "windows":
        out: dict[str, Any] = {"windows": _train_windows(args, tr, log)}
    else:
        out = {"runs": _train_runs(args, tr, log)}
    shardckpt.close()
    return {**out, "n_params": tr.n_params, "ckpt_bytes": ckpt_bytes}
