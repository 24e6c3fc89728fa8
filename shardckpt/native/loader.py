"""Loading one of shardckpt's compiled extensions, with a fallback that is loud.

A missing extension (no compiler at install time, another interpreter) must
never go unnoticed: the slow fallback warns once, on first use, naming why.
An environment variable can force the fallback (tests, debugging).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

__all__ = ["Native"]


class Native:
    """The compiled module ``shardckpt.native.<name>`` or ``None``, and why not."""

    def __init__(self, name: str, force_env: str, fallback: str, consequence: str) -> None:
        self.module: ModuleType | None = None
        self.import_error: ImportError | None = None
        self._fallback, self._consequence = fallback, consequence
        if os.environ.get(force_env, "").strip().lower() in ("1", "true", "yes", "on"):
            self.reason = f"{force_env} is set"
        else:
            try:
                self.module = importlib.import_module(f"shardckpt.native.{name}")
                self.reason = ""
            except ImportError as exc:  # not built, or built for another interpreter
                self.import_error = exc
                self.reason = f"the compiled extension shardckpt.native.{name} could not be imported ({exc})"
        self.warned = False
        self._lock = threading.Lock()

    def warn_once(self) -> None:
        with self._lock:
            if self.warned:
                return
            self.warned = True
        warnings.warn(
            f"shardckpt is using the slow {self._fallback} because {self.reason}; "
            f"{self._consequence} (reinstall shardckpt with a C++ compiler available to build it).",
            RuntimeWarning,
            stacklevel=3,
        )
