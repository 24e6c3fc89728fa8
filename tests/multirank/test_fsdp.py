"""Real training state through shardckpt: FSDP2 (``fully_shard``) and DDP on CPU/gloo.

Train a few Adam steps at 2 ranks, save ``get_state_dict(model, optim)`` with
shardckpt, and keep the full (unsharded) model and optimizer state as a torch.save
reference. Then build the model and optimizer fresh (from another seed) at another
world size, ``shardckpt.load`` + ``set_state_dict``, and compare the gathered full
state with the reference bit for bit: parameters, exp_avg, exp_avg_sq, step and
param_groups.
"""

from __future__ import annotations

import torch

from tests.helpers import assert_state_equal
from tests.multiproc import run_multiprocess

IN, HIDDEN, OUT = 13, 17, 5  # odd sizes: uneven FSDP shards at 2 and 3 ranks
STEPS = 3
LR = 1e-2


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT),
    )


def _fsdp(world_size: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = _model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=LR, weight_decay=0.01)


def _ddp(world_size: int, seed: int):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model(seed))
    return model, torch.optim.Adam(model.parameters(), lr=LR, weight_decay=0.01)


def _train(rank: int, model, optim) -> None:
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own batch
        x, y = torch.randn(8, IN, generator=g), torch.randn(8, OUT, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optim.step()
        optim.zero_grad()


def _full_state(model, optim):
    """The unsharded model and optimizer state, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_worker(rank: int, world_size: int, kind: str, path: str, ref: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import shardckpt

    model, optim = (_fsdp if kind == "fsdp" else _ddp)(world_size, seed=0)
    _train(rank, model, optim)
    msd, osd = get_state_dict(model, optim)
    if kind == "fsdp":
        from torch.distributed.tensor import DTensor

        assert all(isinstance(v, DTensor) for v in msd.values()), {k: type(v) for k, v in msd.items()}
    with shardckpt.knobs.override(chunk_bytes=128):
        shardckpt.save({"model": msd, "optim": osd}, path)
    full_msd, full_osd = _full_state(model, optim)
    if rank == 0:
        torch.save({"model": full_msd, "optim": full_osd}, ref)


def _load_worker(rank: int, world_size: int, kind: str, path: str, ref: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import shardckpt

    model, optim = (_fsdp if kind == "fsdp" else _ddp)(world_size, seed=123)  # not the saved values
    # get_state_dict initializes the fresh optimizer's state (a zero-lr step), so
    # the state_dict has every exp_avg/exp_avg_sq/step to load into
    msd, osd = get_state_dict(model, optim)
    assert osd["state"], "optimizer state was not initialized"
    shardckpt.load({"model": msd, "optim": osd}, path)
    set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd)

    full_msd, full_osd = _full_state(model, optim)
    if rank == 0:
        want = torch.load(ref, weights_only=True)
        assert_state_equal(full_msd, want["model"], "model")
        assert_state_equal(full_osd, want["optim"], "optim")
        # every parameter has Adam state (the loop below must not run over nothing)
        assert len(want["optim"]["state"]) == len(list(model.parameters())), sorted(want["optim"]["state"])
        for fqn, st in want["optim"]["state"].items():
            assert set(st) >= {"step", "exp_avg", "exp_avg_sq"}, (fqn, sorted(st))
            assert int(st["step"]) == STEPS, (fqn, st["step"])
        fresh = _model(123).state_dict()
        assert not torch.equal(fresh["0.weight"], want["model"]["0.weight"])  # the load did something


def _verify(path: str) -> None:
    import shardckpt

    assert shardckpt.verify(path).chunks > 0


def test_fsdp2_save_at_2_load_at_3_and_1(tmp_path):
    path, ref = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    run_multiprocess(_save_worker, 2, "fsdp", path, ref, timeout=90)
    _verify(path)
    run_multiprocess(_load_worker, 3, "fsdp", path, ref, timeout=90)
    run_multiprocess(_load_worker, 1, "fsdp", path, ref, timeout=90)


def test_ddp_save_at_2_load_at_3(tmp_path):
    path, ref = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    run_multiprocess(_save_worker, 2, "ddp", path, ref, timeout=90)
    _verify(path)
    run_multiprocess(_load_worker, 3, "ddp", path, ref, timeout=90)
