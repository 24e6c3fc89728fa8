"""The training-loop entry point: ``CheckpointManager`` and what it is composed of.

Lives here: the manager (``checkpoint_manager``: save/restore by step, retention,
owner marker, async saves), preemption (``preemption``: SIGTERM flag, exit codes,
``run_and_exit``; composed into the manager), and the node-local tier with peer
replicas (``tiers/``). May import: the public API (``api``), ``engine``, ``store``,
``backends``, ``format``, ``state``, ``collectives``, ``errors``, ``knobs``.
Imported by the package root, ``demo``, ``tools`` and ``cli`` only.
"""

from .checkpoint_manager import OWNER_MARKER, CheckpointManager, step_dirname

__all__ = ["CheckpointManager", "OWNER_MARKER", "step_dirname"]
