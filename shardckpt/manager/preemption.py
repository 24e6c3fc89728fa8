"""Surviving process deaths: preemption signals and the root's owner marker.

Both answer "what happens when a training process dies or is told to":
``PreemptionFlag`` turns a signal into a save at the next step boundary, and
``OwnerMarker`` keeps two live managers off one root while letting a restarted
run take over from its own dead predecessor.

Signals
-------

Python runs signal handlers in the main thread between bytecodes, at any
point of the training loop: inside a collective's Python wrapper, halfway
through an optimizer step, while a logging lock is held. Saving a checkpoint
there would be unsafe, so the handler only stores the signal number; the
``CheckpointManager`` acts on it at the next step boundary (``should_save`` /
``save``), where every rank can agree on it and the state is consistent.

Only the first signal is remembered; later ones (a scheduler often signals the
whole process group, and torchrun forwards its own SIGTERM too) change nothing,
so a second SIGTERM cannot abort the save in progress. The backstop for a
worker that never reaches a boundary is the sender's SIGKILL after its grace
period.

The root's owner marker lives in ``shardckpt.store.owner``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, NoReturn

__all__ = ["PreemptionFlag", "exit_code_for", "run_and_exit"]

log = logging.getLogger("shardckpt.manager")

_Handler = Callable[[int, FrameType | None], Any] | int | None


def exit_code_for(signum: int) -> int:
    """128 + the signal number: what a shell reports for a process the signal ended
    (143 for SIGTERM, 138 for SIGUSR1)."""
    return 128 + int(signum)


class PreemptionFlag:
    """Installs handlers for ``signals`` that record the first one received."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        if not self.signals:
            raise ValueError("install_signal_handlers needs at least one signal")
        if threading.current_thread() is not threading.main_thread():
            # signal.signal would raise a bare ValueError; say what to do instead.
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self.received: int | None = None
        self._previous: dict[signal.Signals, _Handler] = {}
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Nothing but an attribute store: no locks, no I/O, no logging.
        if self.received is None:
            self.received = signum

    @property
    def pending(self) -> bool:
        return self.received is not None

    def uninstall(self) -> None:
        """Put back the handlers that were there before (where ours is still installed)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal is main-thread only: ours stays, it only sets a flag
        for s, prev in self._previous.items():
            if signal.getsignal(s) == self._on_signal:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """Run a training script's ``main`` and exit with its code, reliably.

    The manager ends a preempted run with ``SystemExit(143)`` (128 + signal), the
    code torchrun's agent restarts on. With gloo process groups, interpreter
    teardown sometimes aborts the process afterwards ("terminate called without
    an active exception": exit -6 instead of 143), even after
    ``destroy_process_group``. This runs ``main`` (its ``finally`` blocks and
    context managers run as usual), then the ``atexit`` handlers (loggers flush),
    flushes stdio and leaves with ``os._exit``, skipping only that teardown.

    >>> if __name__ == "__main__":
    ...     shardckpt.run_and_exit(main)
    """
    try:
        result = main()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception, then exit 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
