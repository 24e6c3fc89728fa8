"""A small Accelerate training run the tests start (under torchrun, or as one plain process).

It trains a tiny MLP (AdamW, StepLR, a registered progress object, a seedable shuffling
DataLoader) to ``--steps`` optimizer steps, checkpointing every ``--save-every`` steps
with shardckpt (``--mode ours``, ``--async`` for background saves) or Accelerate's own
``save_state`` (``--mode native``), and can resume first (``--resume auto|<path>``).

Test hooks, all on shardckpt's own internals (``SaveTarget.write_items``), never on
Accelerate or torch.distributed:

- ``SLOW_SAVE_AT=<step>``: the save at that step blocks in its writes (the test kills
  the job meanwhile);
- ``VANISH_AT=<step>``: the async save at that step is held until its directory has been
  removed, so its background write fails;
- ``HOLD_LAST_S=<s>``: the last async save's writes are held that long (in flight when
  ``end_training`` is called).

Results: ``--out`` gets ``rank<r>.pt`` (final model, optimizer, torch RNG, step),
``loaded<r>.pt`` right after a resume, ``saved<step>_<r>.pt`` at each save, and
``error<r>.json`` when a shardckpt error stopped the run.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator, DataLoaderConfiguration  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import shardckpt.accelerate as sca  # noqa: E402
from shardckpt.errors import ShardckptError  # noqa: E402
from shardckpt.io.save_target import SaveTarget  # noqa: E402


class Progress:
    """A registered object (register_for_checkpointing): the global step and a loss history."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.losses = int(sd["step"]), list(sd["losses"])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--project", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["ours", "native"], default="ours")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--resume", default="none")
    p.add_argument("--total-limit", type=int, default=None)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--also-native", action="store_true", help="ours mode: also a native save_state beside each save")
    return p.parse_args()


def build(args: argparse.Namespace):
    set_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=args.project, automatic_checkpoint_naming=True, total_limit=args.total_limit),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = x.sum(1, keepdim=True).sin()
    model = torch.nn.Sequential(torch.nn.Linear(8, args.width), torch.nn.Tanh(), torch.nn.Linear(args.width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    dl = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    progress = Progress()
    model, opt, sched, dl = acc.prepare(model, opt, sched, dl)
    acc.register_for_checkpointing(progress)
    return acc, model, opt, sched, dl, progress


# ----------------------------------------------------------------------------- test hooks

_hold = {"event": None, "slow": False}
_real_write = SaveTarget.write_items


def _patched_write(self, *a, **kw):
    if _hold["slow"]:
        time.sleep(600)  # the test SIGKILLs the job while this save is torn
    ev = _hold["event"]
    if ev is not None:
        ev.wait(120)
    return _real_write(self, *a, **kw)


SaveTarget.write_items = _patched_write


def _env_step(name: str) -> int:
    return int(os.environ.get(name, "-1"))


def dump(acc, model, opt, progress, path: Path) -> None:
    torch.save({"model": acc.unwrap_model(model).state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state(), "step": progress.step, "losses": list(progress.losses),
                "acc_step": acc.step, "iteration": acc.project_configuration.iteration}, path)


def native_save(acc, path: str) -> None:
    """Accelerate's own save_state at an explicit path, leaving the automatic numbering as it was."""
    config = acc.project_configuration
    config.automatic_checkpoint_naming = False
    try:
        acc.save_state(path)
    finally:
        config.automatic_checkpoint_naming = True
        config.iteration -= 1


def checkpoint(args, acc, model, opt, progress, out: Path) -> None:
    step, rank = progress.step, acc.process_index
    _hold["slow"] = step == _env_step("SLOW_SAVE_AT")
    vanish = step == _env_step("VANISH_AT")
    hold_last = float(os.environ.get("HOLD_LAST_S", "0")) if step == args.steps else 0.0
    if vanish or hold_last:
        _hold["event"] = threading.Event()
    dump(acc, model, opt, progress, out / f"saved{step}_{rank}.pt")
    if args.mode == "native":
        acc.save_state()
        return
    path = sca.save_state(acc, async_save=args.async_save)
    if args.also_native:
        native_save(acc, os.path.join(args.project, "native", f"checkpoint_{step}"))
    if vanish:
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(path)  # the directory vanishes under the background write
        acc.wait_for_everyone()
        _hold["event"].set()
    elif hold_last:
        threading.Timer(hold_last, _hold["event"].set).start()
    (out / f"path{step}_{rank}.txt").write_text(path)


def resume(args, acc, model, opt, progress, out: Path) -> None:
    if args.resume == "none":
        return
    target = None if args.resume == "auto" else args.resume
    if args.mode == "native":
        acc.load_state(target)
        loaded = target or "native-newest"
        # Accelerate leaves the numbering to the user after a load: the usual manual step.
        ckpts = os.path.join(args.project, "checkpoints")
        names = [int(n.rsplit("_", 1)[1]) for n in os.listdir(ckpts)] if os.path.isdir(ckpts) else []
        acc.project_configuration.iteration = max(names, default=-1) + 1
    else:
        loaded = sca.load_state(acc, target)
    dump(acc, model, opt, progress, out / f"loaded{acc.process_index}.pt")
    (out / f"resumed{acc.process_index}.txt").write_text(loaded)


def train(args, acc, model, opt, sched, dl, progress, out: Path) -> None:
    per_epoch = len(dl)
    while progress.step < args.steps:
        epoch, skip = divmod(progress.step, per_epoch)
        dl.set_epoch(epoch)
        batches = acc.skip_first_batches(dl, skip) if skip else dl
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            progress.step += 1
            progress.losses.append(round(loss.item(), 6))
            if progress.step % args.save_every == 0:
                checkpoint(args, acc, model, opt, progress, out)
            if progress.step >= args.steps:
                break


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # a hung run: kill -USR1 prints every thread's stack
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    acc, model, opt, sched, dl, progress = build(args)
    try:
        resume(args, acc, model, opt, progress, out)
        train(args, acc, model, opt, sched, dl, progress, out)
        acc.end_training()  # waits for the last async commit (shardckpt.accelerate hooks it)
    except ShardckptError as e:
        (out / f"error{acc.process_index}.json").write_text(json.dumps({
            "type": type(e).__name__, "message": str(e), "step": progress.step,
            "path": getattr(e, "path", None), "key": getattr(e, "key", None)}))
        sys.stdout.flush()
        os._exit(3)
    last = out / f"path{args.steps}_{acc.process_index}.txt"
    committed = last.exists() and os.path.exists(os.path.join(last.read_text(), "manifest.json"))
    dump(acc, model, opt, progress, out / f"rank{acc.process_index}.pt")
    (out / f"end{acc.process_index}.json").write_text(json.dumps({"last_committed_at_end": committed}))
    # Exit before main's locals are freed (as tests/multiproc.py skips finalization): freeing the
    # DDP module drops the gloo group end_training destroyed, whose destructor joins a gloo thread
    # that waits for the GIL (seen: a hang in one run of three, with or without a save).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
