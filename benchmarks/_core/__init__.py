"""The parts of ``bench_core.py`` (the script stays the entry point and the command line).

* :mod:`benchmarks._core.peers`: the contenders besides shardckpt and DCP
  (``torch-save``, ``torch-ckpt``) and the page-cache helpers.
* :mod:`benchmarks._core.worker`: one phase's timed saves and loads, on every rank.
* :mod:`benchmarks._core.report`: the printed report and the ``--json`` summary.

The constants below describe the run and are shared by all three.
"""

from __future__ import annotations

from benchmarks._state import N_TENSORS

__all__ = ["ALL_LIBS", "CHECK_TENSORS", "LIBS", "OPS", "PAIRS", "PHASES"]

LIBS = ("shardckpt", "dcp")  # default --libs
ALL_LIBS = ("shardckpt", "dcp", "shardckpt-zstd", "dcp-zstd", "torch-save", "torch-ckpt")
# (ours, peer) pairs whose throughput ratio is reported when both ran
PAIRS = (
    ("shardckpt", "dcp"),
    ("shardckpt-zstd", "dcp-zstd"),
    ("shardckpt-zstd", "dcp"),
    ("shardckpt", "torch-save"),
    ("shardckpt", "torch-ckpt"),
)
CHECK_TENSORS = (0, N_TENSORS - 1)

# op -> (title, world size, target ratio or None)
OPS = {
    "save": ("save (fsync), 2 ranks", 2, 1.5),
    "load_same": ("load, same world 2 -> 2", 2, 1.2),
    "reshard_2to3": ("load, reshard 2 -> 3", 3, 1.5),
    "reshard_2to1": ("load, reshard 2 -> 1", 1, None),
}
PHASES = {"A": (2, ("save", "load_same")), "B": (3, ("reshard_2to3",)), "C": (1, ("reshard_2to1",))}
