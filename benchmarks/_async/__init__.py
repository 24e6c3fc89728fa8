"""The parts of ``bench_async.py`` (the script stays the entry point and the command line).

Rank side, one module per phase (each launched by the script under torchrun):

* :mod:`benchmarks._async.phase_c`: the stall against the memory-copy floor.
* :mod:`benchmarks._async.phase_s`: stall, commit time and memory of five variants.
* :mod:`benchmarks._async.phase_t`: the slowdown of a DDP training loop.
* :mod:`benchmarks._async.measure`: what they measure with: RSS and VmHWM, the
  split of shardckpt's stall into planning and staging, DCP's CUDA-only options.

Driver side: :mod:`benchmarks._async.report` (phases C and S) and
:mod:`benchmarks._async.report_t` (phase T) print the tables and return the
``--json`` summary's parts. The constants below are shared by both sides.
"""

from __future__ import annotations

__all__ = [
    "BATCH",
    "BUDGET_FRACTION",
    "D_IN",
    "FLOOR_RATIO_TARGET",
    "HIDDEN",
    "MiB",
    "PHASES",
    "RSS_SLACK_MIB",
    "S_VARIANTS",
    "T_CONFIGS",
]

PHASES = {"C": 2, "S": 2, "T": 2}  # phase -> ranks
FLOOR_RATIO_TARGET = 1.25  # issue 12 section 3: 2nd+ stall <= 1.25x plain memcpy
S_VARIANTS = ("shardckpt", "shardckpt-budget", "dcp", "dcp-cached", "dcp-bgstage")
T_CONFIGS = ("none", "shardckpt-async", "shardckpt-sync", "dcp-async")
BUDGET_FRACTION = 0.25
RSS_SLACK_MIB = 64
# MLP for phase T: D_IN -> H -> H -> H -> D_IN
D_IN, HIDDEN, BATCH = 1024, 3072, 32
MiB = 1 << 20
