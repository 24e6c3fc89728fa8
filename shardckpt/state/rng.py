"""Random number generator state of every rank: capture, gather, restore.

A rank's RNG state (``RngState``) is a plain dict holding python ``random``,
numpy's global ``np.random`` (when numpy is importable), torch's CPU generator
and, when CUDA is available, the current CUDA device's generator. Everything in
it is a tensor, an int, a float, ``None`` or a string, so it loads with
``torch.load(weights_only=True)`` and round-trips bit for bit.

Rule across a world-size change (``rng_state_for_rank``):

* same world size: rank ``r`` gets exactly the state saved by rank ``r``;
* changed world size (with a ``RngReshardWarning``): rank ``r`` still gets the
  state saved by rank ``r`` when ``r < saved_world_size``; a rank ``r`` that did
  not exist at save time gets fresh generators seeded with
  ``derived_seed(saved[0], r)`` = the first 8 bytes (little-endian) of
  SHA-256(``b"shardckpt-rng"`` ‖ saved rank 0's torch CPU state bytes ‖ ``r`` as
  8 little-endian bytes), as python ``random.seed(seed)``,
  ``torch.manual_seed(seed)`` and numpy ``np.random.seed([seed & 0xFFFFFFFF,
  seed >> 32])`` would leave them. That is deterministic (the same checkpoint
  resumed twice at the same world size gives the same streams), differs between
  ranks, and needs no seed from the user. Saved states of ranks ``>=
  world_size`` are unused.

The same rule applies to CUDA: a saved CUDA state is restored on the current
device; if none was saved (a CPU run resumed on GPU), the current device is
seeded from the derived seed of that rank.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..collectives import Group
from ..errors import ShardckptError

try:  # numpy is optional: its state is captured only when it is importable
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with every torch wheel we test
    np = None  # type: ignore[assignment]

__all__ = [
    "RngState",
    "RngReshardWarning",
    "get_rng_state",
    "set_rng_state",
    "gather_rng_states",
    "rng_state_for_rank",
    "derived_seed",
]

RngState = dict[str, Any]


class RngReshardWarning(UserWarning):
    """RNG state restored at a world size other than the one it was saved at."""


def _words(values: Any) -> torch.Tensor:
    """Mersenne-twister words (< 2**32) as an int32 tensor holding their bit patterns."""
    return torch.tensor([int(v) - (1 << 32) if int(v) >= 1 << 31 else int(v) for v in values],
                        dtype=torch.int32)


def _unwords(t: torch.Tensor) -> list[int]:
    return (t.to(torch.int64) & 0xFFFFFFFF).tolist()


def _cuda_ready() -> bool:
    return torch.cuda.is_available()


def get_rng_state() -> RngState:
    """This process's RNG state: python, numpy, torch CPU and current CUDA device."""
    version, internal, gauss_next = random.getstate()
    state: RngState = {
        "python": {
            "version": version,
            "internal": _words(internal),
            "gauss_next": gauss_next,
        },
        "numpy": None,
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if np is not None:
        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "key": _words(key),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if _cuda_ready():
        # Only the current device: reading every device's state would create a
        # CUDA context on each GPU from every rank.
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _check_state(state: Any) -> None:
    if not isinstance(state, dict) or not {"python", "numpy", "torch", "cuda"} <= set(state):
        raise ValueError(f"not an RNG state saved by shardckpt: {type(state).__name__} "
                         f"with keys {sorted(state) if isinstance(state, dict) else '-'}")


def set_rng_state(state: RngState) -> None:
    """Restore a state returned by ``get_rng_state`` (numpy/CUDA parts when present here)."""
    _check_state(state)
    py = state["python"]
    internal = tuple(int(x) for x in _unwords(py["internal"]))
    random.setstate((int(py["version"]), internal, py["gauss_next"]))
    npst = state["numpy"]
    if np is not None and npst is not None:
        np.random.set_state((
            npst["name"], np.asarray(_unwords(npst["key"]), dtype=np.uint32), int(npst["pos"]),
            int(npst["has_gauss"]), float(npst["cached_gaussian"]),
        ))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if _cuda_ready() and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8), torch.cuda.current_device())


def gather_rng_states(group: dist.ProcessGroup | None = None) -> tuple[RngState, ...]:
    """Every rank's ``get_rng_state()``, indexed by rank, identical on every rank.

    Collective under torch.distributed (bounded and typed, as every shardckpt
    collective); a 1-tuple without it.
    """
    return tuple(Group(group).all_gather("gathering RNG states", get_rng_state, ShardckptError))


def derived_seed(rank0_state: RngState, rank: int) -> int:
    """The 64-bit seed of a rank that has no saved state (see the module docstring)."""
    _check_state(rank0_state)
    h = hashlib.sha256(b"shardckpt-rng")
    h.update(rank0_state["torch"].to(torch.uint8).numpy().tobytes())
    h.update(int(rank).to_bytes(8, "little"))
    return int.from_bytes(h.digest()[:8], "little")


def _seeded_state(seed: int) -> RngState:
    """A full RngState as fresh generators seeded with ``seed`` would have it."""
    version, internal, gauss_next = random.Random(seed).getstate()
    state: RngState = {
        "python": {"version": version, "internal": _words(internal), "gauss_next": gauss_next},
        "numpy": None,
        "torch": torch.Generator().manual_seed(seed).get_state(),
        "cuda": None,
    }
    if np is not None:
        # Legacy seeding takes 32-bit words: feed both halves of the seed.
        _, key, pos, has_gauss, cached = np.random.RandomState(
            [seed & 0xFFFFFFFF, seed >> 32]).get_state(legacy=True)
        state["numpy"] = {"name": "MT19937", "key": _words(key),
                          "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)}
    if _cuda_ready():
        g = torch.Generator(device=f"cuda:{torch.cuda.current_device()}")
        state["cuda"] = g.manual_seed(seed).get_state()
    return state


def rng_state_for_rank(saved: Sequence[RngState], rank: int, world_size: int) -> RngState:
    """The state rank ``rank`` of ``world_size`` restores from the rank-indexed ``saved``.

    Implements the module docstring's rule; warns ``RngReshardWarning`` when
    ``world_size != len(saved)``.
    """
    if not saved:
        raise ValueError("no saved RNG states")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if world_size != len(saved):
        warnings.warn(
            f"RNG state saved at world size {len(saved)} restored at {world_size}: ranks "
            f"< {min(len(saved), world_size)} get their saved state, others a state seeded "
            "from saved rank 0's state and their rank (shardckpt.state.rng)",
            RngReshardWarning, stacklevel=3,
        )
    if rank < len(saved):
        state = saved[rank]
        _check_state(state)
        if state["cuda"] is None and _cuda_ready():
            state = dict(state, cuda=_seeded_state(derived_seed(saved[0], rank))["cuda"])
        return state
    return _seeded_state(derived_seed(saved[0], rank))
