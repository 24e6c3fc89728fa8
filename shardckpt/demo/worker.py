"""The training worker of ``python -m shardckpt.demo.driver`` (one process per rank).

Started by the demo driver through torch's own launcher::

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m shardckpt.demo.worker --root R --run-dir D --phase b ...

It trains a small MLP (FSDP2 ``fully_shard`` or DDP, gloo on CPU) on a
synthetic regression set through a ``ResumableSampler``, with AdamW, a
warmup+cosine ``LambdaLR``, a ``TrainState`` and an async ``CheckpointManager``
that resumes from the newest valid checkpoint and saves on SIGTERM.

What it leaves in ``--run-dir`` for the driver (rank 0 unless said otherwise):

- ``samples/<phase>.r<rank>.jsonl`` (every rank): one line per finished
  optimizer step: step, epoch, the sampler position before the step and the
  dataset indices this rank trained on, so the driver can rebuild the global
  sample sequence by position;
- ``pids/<phase>.r<rank>`` (every rank): its pid. torchrun starts every worker
  in a session of its own, so killing torchrun's process group would not reach
  them: the driver signals each of these;
- ``markers/frozen_<step>`` (with ``--freeze-at K``): the async save of
  ``step`` (the first save at or after ``K``) was still uncommitted when rank 0
  stopped itself with SIGSTOP. Rank 0 commits the manifest, so while it is
  stopped the save cannot complete: the driver's SIGKILL lands mid-save
  deterministically, instead of racing a write window of some 20 ms. If the
  save committed in the instant between the check and the stop, the driver
  sends SIGCONT and rank 0 freezes at the next save;
- ``<phase>.start.json`` (restored step, restore time, ``mgr.list()`` before the
  restore) and ``<phase>.end.json`` (last step, how the phase ended);
- ``<phase>.params.pt``: the full (unsharded) final parameters, when the phase
  ran to the last step.

Training is a function of the global batch only: every step consumes the next
``global_batch`` entries of the sampler's global order whatever the world size
(``global_batch / world_size`` per rank), each rank takes the mean loss of its
part and FSDP/DDP average the gradients over ranks, so the update is the mean
over the global batch at any world size, up to float summation order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from ..format.manifest import MANIFEST_NAME
from ..manager.checkpoint_manager import CheckpointManager, step_dirname
from ..manager.preemption import run_and_exit
from ..state import ResumableSampler, TrainState

__all__ = ["DemoConfig", "make_dataset", "make_model", "main"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything that defines the run; identical in every phase (stored in the checkpoint)."""

    seed: int = 0
    total_steps: int = 48
    global_batch: int = 12  # divisible by 1, 2 and 3: a step means the same samples at each world size
    dataset_len: int = 240  # a multiple of global_batch: epochs end without padding
    save_interval: int = 4
    d_in: int = 32
    hidden: int = 1024  # ~2.1 M parameters: ~26 MB per checkpoint with AdamW's two moments
    d_out: int = 8
    lr: float = 1e-3
    warmup: int = 4
    parallel: str = "fsdp"  # or "ddp"

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch


def make_dataset(cfg: DemoConfig) -> TensorDataset:
    """Synthetic regression: ``y = tanh(x @ W) + noise``, plus each sample's index."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.dataset_len, cfg.d_in, generator=g)
    w = torch.randn(cfg.d_in, cfg.d_out, generator=g) / math.sqrt(cfg.d_in)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(cfg.dataset_len, cfg.d_out, generator=g)
    return TensorDataset(x, y, torch.arange(cfg.dataset_len))


def make_model(cfg: DemoConfig) -> torch.nn.Sequential:
    """The unsharded model, initialized from ``cfg.seed`` (same values at every world size)."""
    torch.manual_seed(cfg.seed)
    h = cfg.hidden
    return torch.nn.Sequential(
        torch.nn.Linear(cfg.d_in, h), torch.nn.GELU(),
        torch.nn.Linear(h, h), torch.nn.GELU(),
        torch.nn.Linear(h, h), torch.nn.GELU(),
        torch.nn.Linear(h, cfg.d_out),
    )


def lr_factor(cfg: DemoConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10 % at ``total_steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup))
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * t))


def _init_process_group() -> None:
    # Each torchrun attempt gets its own key space in the agent's store: on this
    # torch a plain init_process_group("gloo") after a restart can read the dead
    # attempt's gloo addresses from the shared store and fail or hang.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timedelta(seconds=60))


def _parallelize(model: torch.nn.Module, cfg: DemoConfig, world_size: int) -> torch.nn.Module:
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _listing(mgr: CheckpointManager) -> list[dict[str, Any]]:
    return [{"step": c.step, "status": c.status, "size_bytes": c.size_bytes, "reason": c.reason}
            for c in mgr.list()]


def _freeze_mid_save(root: str, run_dir: str, step: int, jitter_s: float) -> None:
    """Rank 0: if the async save of ``step`` is still uncommitted after ``jitter_s``,
    leave a marker and stop this process (SIGSTOP) for the driver to kill."""
    time.sleep(jitter_s)  # a random instant inside the write, not always its first byte
    if os.path.exists(os.path.join(root, step_dirname(step), MANIFEST_NAME)):
        return  # committed already: try the next save
    marker = os.path.join(run_dir, "markers", f"frozen_{step}")
    _write_json(marker, {"step": step, "jitter_s": jitter_s, "pid": os.getpid()})
    os.kill(os.getpid(), signal.SIGSTOP)
    # Only reached after a SIGCONT: the save committed in the instant before the stop,
    # the driver removed the marker, and the next save gets frozen instead.


def train(cfg: DemoConfig, root: str, run_dir: str, phase: str, freeze_at: int | None = None,
          jitter_s: float = 0.0) -> int:
    """One phase: restore (or start fresh), train to ``cfg.total_steps``, return 0.

    A SIGTERM makes the manager save at the next step boundary and exit (143).
    ``freeze_at``: see ``_freeze_mid_save`` (rank 0, first save at or after it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} is not divisible by world size {world}")
    per_rank = cfg.global_batch // world
    # Seed every global RNG, as a real training script does: a resume restores
    # them, so the resumed run's streams match the uninterrupted run's exactly.
    random.seed(cfg.seed * 1000 + rank)
    np.random.seed(cfg.seed * 1000 + rank)
    torch.manual_seed(cfg.seed)
    dataset = make_dataset(cfg)
    model = _parallelize(make_model(cfg), cfg, world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    # Its own generator: creating a DataLoader iterator draws a seed, and a resumed
    # run creates its iterator at another point than the uninterrupted run did.
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler,
                        generator=torch.Generator().manual_seed(cfg.seed))
    state = TrainState(model=model, optimizer=opt, scheduler=sched, sampler=sampler,
                       config=dataclasses.asdict(cfg))

    mgr = CheckpointManager(root, keep_last=3, save_interval_steps=cfg.save_interval, async_save=True)
    mgr.install_signal_handlers()  # SIGTERM: save at the next step boundary, exit 143
    before = _listing(mgr) if rank == 0 else []
    t0 = time.perf_counter()
    restored = mgr.restore(state)  # newest valid checkpoint (verified), or None
    restore_s = time.perf_counter() - t0
    if rank == 0:
        _write_json(os.path.join(run_dir, f"{phase}.start.json"), {
            "world_size": world, "restored": restored, "restore_s": restore_s, "before": before,
            "saved_world_size": state.saved_world_size,
        })
    step = 0 if restored is None else restored  # step N = N optimizer steps done
    log = open(os.path.join(run_dir, "samples", f"{phase}.r{rank}.jsonl"), "a", buffering=1)
    end: dict[str, Any] = {"world_size": world, "last_step": step, "how": "finished"}
    last_saved = restored
    try:
        while step < cfg.total_steps:
            state.epoch = step // cfg.steps_per_epoch
            sampler.set_epoch(state.epoch)  # the current epoch keeps its restored position
            for x, y, idx in loader:  # iter(sampler) starts at the sampler's position
                pos = sampler.consumed
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                sampler.step(per_rank)  # only now are these samples consumed
                step += 1
                log.write(json.dumps({"step": step, "epoch": state.epoch, "pos": pos,
                                      "idx": idx.tolist(), "loss": loss.item()}) + "\n")
                end["last_step"] = step
                if mgr.should_save(step):  # collective: also True when any rank got SIGTERM
                    mgr.save(step, state, metrics={"loss": loss.item()})  # exits if preempted
                    last_saved = step
                    if rank == 0 and freeze_at is not None and step >= freeze_at:
                        _freeze_mid_save(root, run_dir, step, jitter_s)
                if step >= cfg.total_steps:
                    break
        if last_saved != step:
            mgr.save(step, state, force=True)
        mgr.close()  # waits for the in-flight save
    except SystemExit as e:  # the manager's preemption exit, after its synchronous save
        end.update(how="preempted", exit_code=e.code)
        raise
    finally:
        log.close()
        if rank == 0:
            _write_json(os.path.join(run_dir, f"{phase}.end.json"), end)
    _dump_params(model, os.path.join(run_dir, f"{phase}.params.pt"), rank)
    return 0


def _dump_params(model: torch.nn.Module, path: str, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Collective under FSDP2: every rank takes part in gathering the full tensors.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({k.removeprefix("module."): v for k, v in full.items()}, path)


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="checkpoint root")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--phase", required=True)
    p.add_argument("--config", required=True, help="DemoConfig as JSON")
    p.add_argument("--freeze-at", type=int, default=None, help="stop rank 0 mid-save at this save step or later")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="delay before checking the save is in flight")
    args = p.parse_args(argv)
    return DemoConfig(**json.loads(args.config)), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    rank = int(os.environ["RANK"])
    with open(os.path.join(args.run_dir, "pids", f"{args.phase}.r{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    _init_process_group()
    try:
        return train(cfg, args.root, args.run_dir, args.phase, args.freeze_at, args.jitter_ms / 1000)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)  # exit 143 on preemption reaches torchrun even if teardown would abort
