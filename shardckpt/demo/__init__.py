"""The demo: ``python -m shardckpt.demo`` / ``shardckpt-demo``.

Lives here: the driver (``driver``: launches torchrun jobs, kills one mid-save,
preempts one, resumes at other world sizes, checks the result) and the training
worker each rank runs (``worker``). May import the public API, ``manager``,
``state`` and ``format`` (manifest names); nothing imports ``demo``.
"""

from .driver import main

__all__ = ["main"]
