"""TrainState through shardckpt.save / load: a single-process round trip into a fresh
state, extras validation, extra Stateful objects, the RNG rule, and two multi-rank
launches (FSDP2 at 2 ranks: save + exact restore; then restore at 3 ranks)."""

from __future__ import annotations

import hashlib
import random
import warnings

import numpy as np
import pytest
import torch

import shardckpt
from shardckpt.errors import ShardckptError
from shardckpt.state import (
    ResumableSampler,
    RngReshardWarning,
    TrainState,
    derived_seed,
    get_rng_state,
    rng_state_for_rank,
    set_rng_state,
)
from tests.helpers import assert_state_equal
from tests.multiproc import run_multiprocess

N_DATA = 40


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), torch.rand(3)


def _same_draws(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3])


class Counter:
    """A user object that is only ``Stateful``."""

    def __init__(self) -> None:
        self.n = torch.zeros(2, dtype=torch.int64)
        self.tag = "fresh"

    def state_dict(self) -> dict:
        return {"n": self.n, "tag": self.tag}

    def load_state_dict(self, sd: dict) -> None:
        self.n.copy_(sd["n"])
        self.tag = sd["tag"]


def _setup(seed: int, scaler_device: str = "cpu", steps: int = 1, **kw) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler(scaler_device)
    sampler = ResumableSampler(range(N_DATA), num_replicas=1, rank=0, seed=0)
    for _ in range(steps):  # even the "fresh" state has stepped: load must overwrite, not fill
        scaler.scale(model(torch.randn(4, 5)).pow(2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        sampler.step(4)
    return TrainState(model=model, optimizer=opt, scheduler=sched, scaler=scaler, sampler=sampler, **kw)


def _snapshot(st: TrainState) -> dict:
    return {
        "params": [p.detach().clone() for p in st.model.parameters()],
        "optim": st.optimizer.state_dict(),
        "sched": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict(),
        "sampler": st.sampler.state_dict(),
    }


def test_round_trip_into_a_fresh_state(tmp_path, small_chunks):
    src = _setup(0, steps=3, extra={"best_val": float("inf"), "hist": [1, 2.5, None]},
                 config={"lr": 0.1, "layers": [5, 7, 3]}, counter=Counter())
    src.scaler.update(new_scale=1024.0)  # a non-default scale must survive
    src.objects["counter"].n += 5
    src.objects["counter"].tag = "seen"
    src.step, src.epoch = 3, 1
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves python's cached gauss_next set: part of the state too
    expected = _snapshot(src)
    shardckpt.save({"train": src}, tmp_path / "ckpt")
    after_save = _draws()

    dst = _setup(1, steps=2, extra={"best_val": None, "added_later": True},
                 config={"lr": 0.1, "layers": [5, 7, 3]}, counter=Counter())
    assert not torch.equal(dst.model[0].weight, expected["params"][0])
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same world size, same config: nothing to warn about
        shardckpt.load({"train": dst}, tmp_path / "ckpt")
    assert _same_draws(_draws(), after_save)
    assert_state_equal(_snapshot(dst), expected)
    assert (dst.step, dst.epoch) == (3, 1)
    assert dst.extra == {"best_val": float("inf"), "hist": [1, 2.5, None], "added_later": True}
    assert dst.config == {"lr": 0.1, "layers": [5, 7, 3]}
    assert dst.objects["counter"].tag == "seen" and dst.objects["counter"].n.tolist() == [5, 5]
    assert dst.saved_world_size == 1 and dst.saved_env["torch"] == torch.__version__
    assert dst.saved_env["shardckpt"] == shardckpt.__version__
    # The restored run goes on exactly like the original would.
    x = torch.randn(4, 5)
    for st in (src, dst):
        st.scaler.scale(st.model(x).pow(2).sum()).backward()
        st.scaler.step(st.optimizer)
        st.scaler.update()
        st.scheduler.step()
    assert_state_equal([p.detach() for p in dst.model.parameters()], [p.detach() for p in src.model.parameters()])


def test_disabled_scaler_and_scaler_mismatch(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available")
        src = _setup(0, scaler_device="cuda", steps=1)  # disabled on a CPU host
        assert not src.scaler.is_enabled()
        shardckpt.save({"train": src}, tmp_path / "off")
        dst = _setup(1, scaler_device="cuda", steps=0)
    shardckpt.load({"train": dst}, tmp_path / "off")
    assert_state_equal([p.detach() for p in dst.model.parameters()], [p.detach() for p in src.model.parameters()])
    enabled = _setup(2, steps=0)
    with pytest.warns(UserWarning, match="GradScaler was disabled when saved and is enabled now"):
        shardckpt.load({"train": enabled}, tmp_path / "off")
    assert enabled.scaler.get_scale() == 65536.0


def test_extras_must_be_json(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['bad'\] is a object"):
        TrainState(extra={"ok": 1, "bad": object()})
    with pytest.raises(TypeError, match=r"extra\['t'\] is a tuple.*use a list"):
        TrainState(extra={"t": (1, 2)})
    with pytest.raises(TypeError, match=r"config\['nested'\]\[1\] is a Tensor"):
        TrainState(config={"nested": [1, torch.ones(1)]})
    with pytest.raises(TypeError, match="non-string key 3"):
        TrainState(extra={"m": {3: 1}})
    st = TrainState(extra={"ok": 1})
    st.extra["later"] = {1, 2}  # mutated after construction: caught at save
    with pytest.raises(TypeError, match=r"extra\['later'\] is a set"):
        st.state_dict()
    with pytest.raises(shardckpt.CheckpointWriteError, match=r"extra\['later'\]"):
        shardckpt.save({"train": st}, tmp_path / "x")
    with pytest.raises(TypeError, match="counter=int has no state_dict"):
        TrainState(counter=3)
    with pytest.raises(ValueError, match="optimizer needs its model"):
        TrainState(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))


def test_state_without_model_and_config_warning(tmp_path):
    src = TrainState(extra={"a": 1}, config={"lr": 1, "bs": 8}, step=7, counter=Counter())
    shardckpt.save({"train": src}, tmp_path / "c")
    dst = TrainState(config={"lr": 2, "bs": 8}, counter=Counter())
    with pytest.warns(UserWarning, match=r"config differs from the checkpoint's in \['lr'\]"):
        shardckpt.load({"train": dst}, tmp_path / "c")
    assert dst.config == {"lr": 1, "bs": 8} and dst.step == 7 and dst.extra == {"a": 1}


def test_rng_rule_is_pure_and_documented():
    states = []
    for seed in (10, 11):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        states.append(get_rng_state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rng_state_for_rank(states, 1, 2) is states[1]
    with pytest.warns(RngReshardWarning):
        assert rng_state_for_rank(states, 1, 3) is states[1]
    with pytest.warns(RngReshardWarning):
        derived = rng_state_for_rank(states, 2, 3)
    # The documented seed, computed independently of the library.
    digest = hashlib.sha256(b"shardckpt-rng" + states[0]["torch"].numpy().tobytes() + (2).to_bytes(8, "little"))
    seed = int.from_bytes(digest.digest()[:8], "little")
    assert derived_seed(states[0], 2) == seed
    set_rng_state(derived)
    got = _draws()
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed)
    assert _same_draws(got, _draws())


# -- multi-rank ---------------------------------------------------------------------------

BATCH = 2


def _fsdp_state(world_size: int, seed: int) -> TrainState:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(9, 13), torch.nn.ReLU(), torch.nn.Linear(13, 5))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    sampler = ResumableSampler(range(N_DATA), seed=4)
    return TrainState(model=model, optimizer=opt, scheduler=sched, sampler=sampler, extra={"best": None})


def _full(st: TrainState) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(st.model, st.optimizer, options=StateDictOptions(full_state_dict=True))
    return {"model": msd, "optim": osd["state"], "sched": st.scheduler.state_dict()}


def _seed_rank(rank: int) -> None:
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)


def _save_worker(rank: int, world_size: int, d: str) -> None:
    st = _fsdp_state(world_size, seed=0)
    # A bad extra on one rank only: every rank raises, naming it; no rank hangs.
    if rank == 1:
        st.extra["bad"] = {1}
    with pytest.raises(ShardckptError, match=r"rank\(s\) \[1\].*extra\['bad'\] is a set"):
        st.state_dict()
    st.extra.pop("bad", None)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * rank + step)
        st.model(torch.randn(BATCH, 9, generator=g)).pow(2).mean().backward()
        st.optimizer.step()
        st.optimizer.zero_grad()
        st.scheduler.step()
        st.sampler.step(BATCH)
        st.step += 1
    st.extra["best"] = 0.5
    _seed_rank(rank)
    torch.save(get_rng_state(), f"{d}/rng{rank}.pt")  # what save captures on this rank
    shardckpt.save({"train": st}, f"{d}/ckpt")
    after = _draws()
    torch.save(after, f"{d}/draws{rank}.pt")
    full = _full(st)
    if rank == 0:
        torch.save(full, f"{d}/full.pt")

    # Same world size: a fresh state (other init, no steps) restores every rank exactly.
    fresh = _fsdp_state(world_size, seed=1)
    _seed_rank(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RngReshardWarning)
        shardckpt.load({"train": fresh}, f"{d}/ckpt")
    assert _same_draws(_draws(), after), f"rank {rank}: RNG not restored exactly"
    assert_state_equal(_full(fresh), full)
    assert fresh.step == 2 and fresh.extra == {"best": 0.5}
    assert fresh.sampler.consumed == 2 * 2 * BATCH and fresh.saved_world_size == 2


def _load3_worker(rank: int, world_size: int, d: str) -> None:
    st = _fsdp_state(world_size, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardckpt.load({"train": st}, f"{d}/ckpt")
    assert any(issubclass(w.category, RngReshardWarning) for w in caught), [str(w.message) for w in caught]
    got = _draws()
    if rank < 2:  # a rank that existed at save time: its own stream
        assert _same_draws(got, torch.load(f"{d}/draws{rank}.pt", weights_only=True))
    else:  # the documented rule: fresh generators seeded from saved rank 0's state and r
        rank0 = torch.load(f"{d}/rng0.pt", weights_only=True)
        seed = derived_seed(rank0, rank)
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        torch.manual_seed(seed)
        assert _same_draws(got, _draws())
    assert_state_equal(_full(st), torch.load(f"{d}/full.pt", weights_only=True))
    # The data position reshards: rank r continues at global position consumed + r.
    perm = st.sampler.global_order().tolist()
    assert st.sampler.consumed == 8 and next(iter(st.sampler)) == perm[8 + rank]


def test_multirank_save_2_restore_2_and_3(tmp_path):
    run_multiprocess(_save_worker, 2, str(tmp_path))
    run_multiprocess(_load3_worker, 3, str(tmp_path))
