"""Plan caching (``_plan_cache.py``): a save with the same structure reuses the last
plan after one all-reduce; any change in structure plans again, and a stale plan
is never used (every checkpoint loads bitwise and holds exactly its own keys)."""

from __future__ import annotations

import torch

from tests.multiproc import run_multiprocess


def _counting(monkeypatch_like: dict) -> None:
    import shardckpt.engine.save as save_mod

    real = save_mod.plan_globally

    def counted(summaries):
        monkeypatch_like["n"] += 1
        return real(summaries)

    save_mod.plan_globally = counted


def _worker(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import shardckpt
    from shardckpt.store import CheckpointDir

    calls = {"n": 0}
    _counting(calls)
    mesh = init_device_mesh("cpu", (world,))

    def state(seed: int, dim: int = 0, extra: bool = False) -> dict:
        g = torch.Generator().manual_seed(seed)
        sd = {"w": distribute_tensor(torch.randn(8, 6, generator=g), mesh, [Shard(dim)], src_data_rank=None),
              "b": torch.randn(5, generator=g), "step": seed}
        if extra and rank == 1:
            sd["extra"] = torch.full((3,), float(seed))
        return sd

    def check(path: str, sd: dict, strict: bool = True) -> None:
        out = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0) for k, v in sd.items()}
        shardckpt.load(out, path, strict=strict)
        for k, v in sd.items():
            got = out[k]
            if isinstance(v, torch.Tensor):
                a = got.full_tensor() if hasattr(got, "full_tensor") else got
                b = v.full_tensor() if hasattr(v, "full_tensor") else v
                assert torch.equal(a, b), (path, k)
            else:
                assert got == v, (path, k)

    shardckpt.save(state(1), f"{root}/a")
    first = calls["n"]
    shardckpt.save(state(2), f"{root}/b")  # same structure, new values: the cached plan
    check(f"{root}/a", state(1))
    check(f"{root}/b", state(2))
    if rank == 0:
        assert first == 1 and calls["n"] == 1, calls
    # a key on one rank only: that rank's summary changed, everyone plans again
    shardckpt.save(state(3, extra=True), f"{root}/c")
    if rank == 0:
        assert calls["n"] == 2, calls
        assert "extra" in CheckpointDir.at(f"{root}/c").read_manifest().entries
    check(f"{root}/c", state(3, extra=True), strict=False)
    # same keys and shapes, another placement: the boxes changed
    shardckpt.save(state(4, dim=1), f"{root}/d")
    check(f"{root}/d", state(4, dim=1))
    if rank == 0:
        assert calls["n"] == 3, calls
        assert "extra" not in CheckpointDir.at(f"{root}/d").read_manifest().entries
    # back to the first structure: planned again (the cache holds the last plan only)
    shardckpt.save(state(5), f"{root}/e")
    check(f"{root}/e", state(5))
    # async saves plan on their own group: the first plans, the next reuses
    with shardckpt.AsyncCheckpointer() as ckpt:
        ckpt.async_save(state(6), f"{root}/f").result()
        n = calls["n"]
        ckpt.async_save(state(7), f"{root}/g").result()
        if rank == 0:
            assert calls["n"] == n, calls
    check(f"{root}/g", state(7))
    # the replica check still runs on a cached plan: rank 1's copy of "b" drifts
    bad = state(8)
    if rank == 1:
        bad["b"] = bad["b"] + 1
    n = calls["n"]
    try:
        shardckpt.save(bad, f"{root}/h")
    except shardckpt.CheckpointWriteError as e:
        assert "'b'" in str(e) and "ranks [0] vs ranks [1]" in str(e), str(e)
    else:
        raise AssertionError("diverged replicas were saved")
    if rank == 0:
        assert calls["n"] == n, calls
    dist.barrier()


def test_plan_cache_reuses_and_never_goes_stale(tmp_path):
    run_multiprocess(_worker, 2, str(tmp_path), timeout=240)


def test_single_process_cache_follows_dtype_change(tmp_path):
    import shardckpt

    calls = {"n": 0}
    import shardckpt.engine.save as save_mod

    real = save_mod.plan_globally

    def counted(summaries):
        calls["n"] += 1
        return real(summaries)

    save_mod.plan_globally = counted
    try:
        shardckpt.save({"x": torch.ones(4)}, tmp_path / "a")
        shardckpt.save({"x": torch.ones(4) * 2}, tmp_path / "b")
        assert calls["n"] == 1
        shardckpt.save({"x": torch.ones(4, dtype=torch.float64)}, tmp_path / "c")
        assert calls["n"] == 2
        out = {"x": torch.zeros(4, dtype=torch.float64)}
        shardckpt.load(out, tmp_path / "c")
        assert out["x"].dtype == torch.float64 and torch.equal(out["x"], torch.ones(4, dtype=torch.float64))
        out = {"x": torch.zeros(4)}
        shardckpt.load(out, tmp_path / "b")
        assert torch.equal(out["x"], torch.ones(4) * 2)
    finally:
        save_mod.plan_globally = real


def test_a_rank_without_a_cache_does_not_reuse():
    from shardckpt.collectives import Group
    from shardckpt.engine import plan_cache as _plan_cache

    _plan_cache.forget_all()
    assert _plan_cache.lookup(Group(), b"x") is None
