"""One training run of a tiny GPT-2 under Transformers' Trainer, native or
``ShardckptTrainer``, started by the tests in ``test_transformers_*.py`` (under
torchrun for several processes, or as a plain process).

``SHARDCKPT_TEST_SLOW_SAVE=N`` makes the N-th checkpoint's shard writes sleep
(our own ``SaveTarget.write_items``, never the trainer), so that a test can kill
the run while that checkpoint is torn. Prints ``RESULT {json}`` on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

__all__ = ["TinyDataset", "tiny_model", "make_args", "main"]


class TinyDataset(torch.utils.data.Dataset):
    """Token sequences from their index alone: the same on every process and run."""

    def __init__(self, n: int = 48, length: int = 16) -> None:
        self.n, self.length = n, length

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randint(0, 64, (self.length,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def tiny_model(width: int = 32) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (dropout on: resume must restore the RNG), the same weights everywhere."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=width, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_args(out: str, max_steps: int, save_steps: int, **kw: Any) -> TrainingArguments:
    # gloo only under torchrun: in a plain process Accelerate would expect a process group
    base: dict[str, Any] = dict(use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    base.update(kw)
    return TrainingArguments(output_dir=out, max_steps=max_steps, save_steps=save_steps, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], seed=1, dataloader_num_workers=0, disable_tqdm=True, **base)


def _slow_save_from_env() -> None:
    n = int(os.environ.get("SHARDCKPT_TEST_SLOW_SAVE", "0"))
    if not n:
        return
    from shardckpt.io.save_target import SaveTarget

    real, seen = SaveTarget.write_items, {"saves": 0, "last": None}

    def slow(self: Any, *args: Any) -> Any:
        if seen["last"] is not self:  # a new save's target: count it once
            seen["last"], seen["saves"] = self, seen["saves"] + 1
        if seen["saves"] == n:
            time.sleep(600)
        return real(self, *args)

    SaveTarget.write_items = slow  # type: ignore[method-assign]


class _DumpAfterLoad(TrainerCallback):
    """Rank 0 writes the model's weights as training begins (after any resume)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        full = _full_state(model)  # every rank: gathering an FSDP shard is collective
        if args.process_index == 0:
            torch.save(full, self.path)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as whole CPU tensors (FSDP's DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


def _resume_arg(value: str) -> Any:
    return {"none": None, "true": True}.get(value, value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--trainer", choices=["native", "ours"], default="ours")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--resume", default="none")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--final", default="")
    p.add_argument("--dump-after-load", default="")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 through Trainer's fsdp arguments (GPU only)")
    a = p.parse_args(argv)
    _slow_save_from_env()
    fsdp: dict[str, Any] = {}
    if a.fsdp:  # Accelerate's FSDP plugin, version 2 (on CPU Trainer would fall back to DDP)
        fsdp = dict(fsdp="full_shard", fsdp_config={"version": 2}, use_cpu=False, ddp_backend="nccl")
    args = make_args(a.out, a.max_steps, a.save_steps, **fsdp)
    callbacks = [_DumpAfterLoad(a.dump_after_load)] if a.dump_after_load else []
    kw: dict[str, Any] = dict(model=tiny_model(a.width), args=args, train_dataset=TinyDataset(), callbacks=callbacks)
    if a.trainer == "ours":
        from shardckpt.transformers import ShardckptTrainer

        trainer: Trainer = ShardckptTrainer(**kw, async_save=a.async_save)
    else:
        trainer = Trainer(**kw)
    trainer.train(resume_from_checkpoint=_resume_arg(a.resume))
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = _full_state(trainer.model) if a.final else None
    if rank == 0:
        if final is not None:
            torch.save(final, a.final)
        result = {"global_step": trainer.state.global_step, "resumed_from": getattr(trainer, "resumed_from", None),
                  "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
                  "world_size": args.world_size, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
        print("RESULT " + json.dumps(result), flush=True)
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Finish background saves and leave without interpreter finalization: C++
    static destructors racing library threads abort the process after the run
    passed (as in tests/multiproc.py), which is not what these tests are about."""
    import shardckpt

    shardckpt.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
