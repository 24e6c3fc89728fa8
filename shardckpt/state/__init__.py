"""Training state for resumable runs: ``TrainState`` (model, optimizer, scheduler,
scaler, RNG of every rank, data position, progress, extras), ``ResumableSampler``
(a ``DistributedSampler`` whose position reshards), and the RNG helpers.

May import: ``collectives``, ``format`` (the JSON codec), ``errors``. An entry
point: users build it; the manager and the demo use it.

>>> state = TrainState(model=model, optimizer=opt, sampler=ResumableSampler(ds))
>>> shardckpt.save({"train": state}, "ckpts/step_100")
"""

from .rng import (
    RngReshardWarning,
    RngState,
    derived_seed,
    gather_rng_states,
    get_rng_state,
    rng_state_for_rank,
    set_rng_state,
)
from .sampler import ResumableSampler
from .train_state import TrainState

__all__ = [
    "TrainState",
    "ResumableSampler",
    "RngState",
    "RngReshardWarning",
    "get_rng_state",
    "set_rng_state",
    "gather_rng_states",
    "rng_state_for_rank",
    "derived_seed",
]
