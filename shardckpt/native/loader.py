"""The one loader for shardckpt's compiled kernels, with one fallback shape that is loud.

Every kernel family (``crc32c``, ``bytegroup``, ``copy``) is loaded the same way:
``Native(...).bind(name=fallback, ...)`` gives, per function, the compiled one, or
a wrapper that warns once (for the whole family, on first use of any of its
functions, naming why) and then calls the numpy / pure-Python fallback. A missing
extension (no compiler at install time, another interpreter) therefore never goes
unnoticed, and an environment variable forces the fallback (tests, debugging).

``as_u8`` is the one buffer-protocol check the fallbacks share (the compiled
kernels make the same checks in ``csrc/pyext_common.h``).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["Native", "as_u8"]


class Native:
    """The compiled module ``shardckpt.native.<name>`` or ``None``, and why not.

    ``fallback`` names the slow path in the warning (and is what ``implementation()``
    reports without the extension); ``consequence`` says what it costs."""

    def __init__(self, name: str, force_env: str, *, fallback: str, label: str, consequence: str) -> None:
        self.module: ModuleType | None = None
        self.import_error: ImportError | None = None
        self.force_env = force_env
        self._fallback, self._label, self._consequence = fallback, label, consequence
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
            stacklevel=4,
        )

    def bind(self, **fallbacks: Callable[..., Any]) -> tuple[Callable[..., Any], ...]:
        """Per name: the compiled function, or the fallback behind a warn-once wrapper."""
        if self.module is not None:
            return tuple(getattr(self.module, name) for name in fallbacks)
        return tuple(self._warned(fn) for fn in fallbacks.values())

    def _warned(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.warned:
                self.warn_once()
            return fn(*args, **kwargs)

        return call

    def implementation(self) -> str:
        """``"compiled:<kernel>"`` (the CPU path the extension picked) or the fallback's label."""
        return "compiled:" + self.module.implementation() if self.module is not None else self._label

    def is_compiled(self) -> bool:
        """True when the C++ extension is doing the work."""
        return self.module is not None


def as_u8(buf: Any, writable: bool, what: str) -> np.ndarray:
    """A C-contiguous buffer as a flat uint8 array (empty buffers included)."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{what} must support the buffer protocol, not {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise BufferError(f"{what} is not C-contiguous; pass a contiguous buffer")
    if writable and mv.readonly:
        raise TypeError(f"{what} must be a writable buffer")
    if not mv.nbytes:
        return np.empty(0, np.uint8)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return np.frombuffer(mv, dtype=np.uint8)
