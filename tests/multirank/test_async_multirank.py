"""Async save across real gloo ranks: training collectives run while a save is in
flight, and a background failure on one rank reaches every rank."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_multiprocess


def _train_while_saving(rank, world_size, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import shardckpt

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    full = torch.randn(4096, 512)  # 8 MiB
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "r": full[:100].clone(), "step": 7}
    with shardckpt.AsyncCheckpointer() as ckpt:
        h = ckpt.async_save(sd, path)
        # training goes on: its own collectives on the default group, and in-place updates
        acc = torch.zeros(1)
        for _ in range(50):
            x = torch.ones(1)
            dist.all_reduce(x)
            acc += x
        sd["w"].to_local().mul_(0)
        sd["r"].mul_(0)
        h.result()
    assert acc.item() == 50 * world_size
    out = {"w": distribute_tensor(torch.zeros(4096, 512), mesh, [Shard(0)]), "r": torch.zeros(100, 512), "step": 0}
    shardckpt.load(out, path)
    assert torch.equal(out["w"].full_tensor(), full) and torch.equal(out["r"], full[:100]) and out["step"] == 7


def _one_rank_fails(rank, world_size, path):
    import shardckpt
    from shardckpt.io.save_target import SaveTarget

    if rank == 1:
        def disk_full(self, *args):
            raise OSError(28, "No space left on device")

        SaveTarget.write_items = disk_full
    sd = {f"t{r}": torch.full((1000,), float(r)) for r in range(4)}  # replicated: spread over ranks
    with shardckpt.AsyncCheckpointer() as ckpt:
        h = ckpt.async_save(sd, path)
        with pytest.raises(shardckpt.CheckpointWriteError) as ei:
            h.result()
        assert 1 in ei.value.rank_errors and "rank(s) [1]" in str(ei.value), str(ei.value)
        assert "No space left" in str(ei.value)
        dist.barrier()
        assert not os.path.exists(os.path.join(path, "manifest.json"))


def test_training_collectives_during_background_save(tmp_path):
    run_multiprocess(_train_while_saving, 2, str(tmp_path / "c"), timeout=120)


def test_background_failure_on_one_rank_reaches_all(tmp_path):
    run_multiprocess(_one_rank_fails, 2, str(tmp_path / "c"), timeout=120)
