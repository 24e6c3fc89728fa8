"""Preemption: a signal turns into a save at the next step boundary, then an exit
torchrun restarts from.

Python runs signal handlers in the main thread between bytecodes, at any
point of the training loop: inside a collective's Python wrapper, halfway
through an optimizer step, while a logging lock is held. Saving a checkpoint
there would be unsafe, so the handler (``PreemptionFlag``) only stores the
signal number; ``Preemption`` (composed into ``CheckpointManager``) reduces it
over ranks at the next step boundary (``should_save`` / ``save``), where every
rank can agree on it and the state is consistent.

Only the first signal is remembered; later ones (a scheduler often signals the
whole process group, and torchrun forwards its own SIGTERM too) change nothing,
so a second SIGTERM cannot abort the save in progress. The backstop for a
worker that never reaches a boundary is the sender's SIGKILL after its grace
period. ``run_and_exit`` runs a training ``main`` so that the exit code of a
preempted run reaches torchrun even if interpreter teardown would abort.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any, NoReturn

from ..collectives import Group
from ..errors import ShardckptError

__all__ = ["Preemption", "PreemptionFlag", "exit_code_for", "run_and_exit"]

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


class Preemption:
    """A manager's preemption state, composed into it: the installed flag, the exit
    code to use, and the agreement over the manager's control group."""

    def __init__(self, ctl: Group) -> None:
        self._ctl = ctl
        self._flag: PreemptionFlag | None = None
        self._exit_code: int | None = None

    def install(self, signals: Sequence[int], exit_code: int | None) -> None:
        if exit_code is not None and (not isinstance(exit_code, int) or not 1 <= exit_code <= 255):
            raise ValueError(f"exit_code must be in 1..255 (0 means success to torchrun: no restart), got {exit_code!r}")
        self.uninstall()
        self._flag = PreemptionFlag(signals)
        self._exit_code = exit_code

    @property
    def pending(self) -> bool:
        """Whether this rank received one of the installed signals (not reduced over ranks)."""
        return self._flag is not None and self._flag.pending

    def agree(self) -> int:
        """The signal any rank received (0 if none), the same value on every rank."""
        if self._flag is None:
            return 0
        return self._ctl.max_over_ranks("agreeing on a preemption", self._flag.received or 0, ShardckptError)

    def exit_code(self, signum: int) -> int:
        return self._exit_code if self._exit_code is not None else exit_code_for(signum)

    def uninstall(self) -> None:
        if self._flag is not None:
            self._flag.uninstall()
            self._flag = None
