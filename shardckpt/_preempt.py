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

Owner marker
------------
``<root>/.shardckpt-owner`` (JSON: hostname, pid, time, a random token, the
torchrun run id and restart count) is created by rank 0 when a manager opens a
root and removed by ``close``. A second manager finding a live owner raises
``CheckpointExistsError``. An owner is stale, and taken over with a warning,
when its pid is gone on this host, or when it is an earlier attempt of the same
torchrun job (same ``TORCHELASTIC_RUN_ID``, lower ``TORCHELASTIC_RESTART_COUNT``;
the agent kills a worker group before restarting it), or when the caller says
so (``take_over_lock=True``).

Limits: liveness can only be checked on the owner's own host; a marker left by a
process that died on another host blocks the root until it is deleted or taken
over explicitly (an elastic restart of the same job is recognized by run id).
Exclusive creation is ``O_EXCL`` on local and NFSv3+ filesystems; object stores
have no such primitive, so there it is write-then-read-back, which narrows the
race of two managers starting in the same instant but cannot close it. Before
every save the owner checks that the marker still holds its token, so a
manager whose root was taken over stops writing instead of interleaving.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any, NoReturn

from .errors import CheckpointExistsError
from .storage import LocalStorage, Storage

__all__ = ["PreemptionFlag", "exit_code_for", "OwnerMarker", "OWNER_MARKER", "run_and_exit"]

log = logging.getLogger("shardckpt.manager")
OWNER_MARKER = ".shardckpt-owner"

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


class OwnerMarker:
    """The owner marker of one root, held by one manager (used on rank 0 only)."""

    def __init__(self, storage: Storage, take_over: bool = False) -> None:
        self._storage = storage
        self._take_over = take_over
        self.token = os.urandom(16).hex()

    def acquire(self) -> None:
        """Create the marker, or raise ``CheckpointExistsError`` if a live owner holds it."""
        self._storage.makedirs("")
        mine = json.dumps({
            "hostname": socket.gethostname(), "pid": os.getpid(), "created_unix": time.time(),
            "token": self.token, "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            "restart_count": _int_env("TORCHELASTIC_RESTART_COUNT"),
        }).encode()
        url = self._storage.url
        for _ in range(5):  # the marker may come and go while we look at it
            if self._create(mine):
                return
            try:
                current = json.loads(self._storage.read_bytes(OWNER_MARKER))
            except FileNotFoundError:
                continue
            except (ValueError, OSError) as e:
                current = {"unreadable": str(e)}
            if not isinstance(current, dict):
                current = {"unreadable": "not a JSON object"}
            stale = self._stale_reason(current)
            if stale is None:
                raise CheckpointExistsError(
                    f"{url} is in use by another CheckpointManager ({_describe(current)}); two managers "
                    "writing one root would interleave and delete each other's checkpoints. If that "
                    f"owner is dead, delete {OWNER_MARKER} there or pass take_over_lock=True", path=url)
            log.warning("taking over %s from a stale owner (%s): %s", url, _describe(current), stale)
            self._storage.remove(OWNER_MARKER)
        raise CheckpointExistsError(f"could not take ownership of {url}: its owner marker keeps changing", path=url)

    def check(self) -> None:
        """Raise ``CheckpointExistsError`` unless the marker still holds our token."""
        if self._read_token() != self.token:
            raise CheckpointExistsError(
                f"this manager no longer owns {self._storage.url} (its {OWNER_MARKER} was removed or "
                "taken over); not saving", path=self._storage.url)

    def release(self) -> None:
        """Remove the marker if it is still ours; failures only warn."""
        try:
            if self._read_token() == self.token:
                self._storage.remove(OWNER_MARKER)
        except OSError as e:
            log.warning("could not remove %s/%s: %s", self._storage.url, OWNER_MARKER, e)

    def _create(self, data: bytes) -> bool:
        if isinstance(self._storage, LocalStorage):
            # O_EXCL: of two managers starting at once, exactly one creates the marker.
            path = os.path.join(self._storage.root, OWNER_MARKER)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        if self._storage.exists(OWNER_MARKER):
            return False
        self._storage.write_atomic(OWNER_MARKER, data)
        return self._read_token() == self.token

    def _stale_reason(self, owner: Mapping[str, Any]) -> str | None:
        pid = owner.get("pid")
        if owner.get("hostname") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        theirs = owner.get("restart_count")
        if (run_id not in (None, "", "none") and owner.get("run_id") == run_id
                and isinstance(theirs, int) and _int_env("TORCHELASTIC_RESTART_COUNT") > theirs):
            return f"it is attempt {theirs} of this torchrun job {run_id}, which was restarted"
        if self._take_over:
            return "take_over_lock=True"
        return None

    def _read_token(self) -> str | None:
        try:
            owner = json.loads(self._storage.read_bytes(OWNER_MARKER))
        except (FileNotFoundError, ValueError):
            return None
        token = owner.get("token") if isinstance(owner, dict) else None
        return token if isinstance(token, str) else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process we can check: assume alive (fail closed)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def _describe(owner: Mapping[str, Any]) -> str:
    if "unreadable" in owner:
        return f"unreadable marker: {owner['unreadable']}"
    when = owner.get("created_unix")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"host {owner.get('hostname')}, pid {owner.get('pid')}, since {since}"


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
