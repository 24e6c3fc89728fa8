"""The owner marker of a root of checkpoints: one live manager per root.

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
Exclusive creation is the backend's ``create_exclusive`` where it declares
``exclusive_create``: ``O_EXCL`` on local and NFSv3+ filesystems, a conditional
PUT (``If-None-Match: *``) on S3 (AWS since 2024, and MinIO/moto). Elsewhere (and
on S3-compatibles without conditional writes) it is write-then-read-back, which
narrows the race of two managers starting in the same instant but cannot close
it. Before
every save the owner checks that the marker still holds its token, so a
manager whose root was taken over stops writing instead of interleaving.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..backends import Storage
from ..errors import CheckpointExistsError, CheckpointWriteError
from ..format import jsoncodec

__all__ = ["OwnerMarker", "OWNER_MARKER"]

log = logging.getLogger("shardckpt.manager")
OWNER_MARKER = ".shardckpt-owner"


class OwnerMarker:
    """The owner marker of one root, held by one manager (used on rank 0 only)."""

    def __init__(self, storage: Storage, take_over: bool = False) -> None:
        self._storage = storage
        self._take_over = take_over
        self.token = os.urandom(16).hex()

    def acquire(self) -> None:
        """Create the marker, or raise ``CheckpointExistsError`` if a live owner holds it
        (``CheckpointWriteError`` if the storage fails)."""
        with _typed_io(f"taking ownership of {self._storage.url}"):
            self._acquire()

    def _acquire(self) -> None:
        self._storage.makedirs("")
        mine = jsoncodec.encode({
            "hostname": socket.gethostname(), "pid": os.getpid(), "created_unix": time.time(),
            "token": self.token, "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            "restart_count": _int_env("TORCHELASTIC_RESTART_COUNT"),
        })
        url = self._storage.url
        for _ in range(5):  # the marker may come and go while we look at it
            if self._create(mine):
                return
            try:
                current = jsoncodec.decode(self._storage.read_bytes(OWNER_MARKER))
            except FileNotFoundError:
                continue
            except (ValueError, OSError) as e:
                current = {"unreadable": str(e)}
            if not isinstance(current, dict):
                current = {"unreadable": "not a JSON object"}
            stale = self.stale_reason(current)
            if stale is None:
                raise CheckpointExistsError(
                    f"{url} is in use by another CheckpointManager ({_describe(current)}); two managers "
                    "writing one root would interleave and delete each other's checkpoints. If that "
                    f"owner is dead, delete {OWNER_MARKER} there or pass take_over_lock=True", path=url)
            log.warning("taking over %s from a stale owner (%s): %s", url, _describe(current), stale)
            self._storage.remove(OWNER_MARKER)
        raise CheckpointExistsError(f"could not take ownership of {url}: its owner marker keeps changing", path=url)

    def check(self) -> None:
        """Raise ``CheckpointExistsError`` unless the marker still holds our token
        (``CheckpointWriteError`` if it cannot be read)."""
        with _typed_io(f"checking the owner marker of {self._storage.url}"):
            token = self._read_token()
        if token != self.token:
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
        if self._storage.capabilities.exclusive_create:
            return self._storage.create_exclusive(OWNER_MARKER, data)
        if self._storage.exists(OWNER_MARKER):
            return False
        self._storage.put(OWNER_MARKER, data)
        return self._read_token() == self.token

    def stale_reason(self, owner: Mapping[str, Any]) -> str | None:
        """Why the marker's ``owner`` no longer holds the root (None: it may): its
        process on this host is gone, or it belongs to an earlier torchelastic run."""
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
            owner = jsoncodec.decode(self._storage.read_bytes(OWNER_MARKER))
        except (FileNotFoundError, ValueError):
            return None
        token = owner.get("token") if isinstance(owner, dict) else None
        return token if isinstance(token, str) else None


@contextmanager
def _typed_io(what: str) -> Iterator[None]:
    # Storage failures of the marker are save failures, typed like the others.
    try:
        yield
    except OSError as e:
        if isinstance(e, CheckpointExistsError):
            raise
        hint = (" (to only restore from a root that cannot be written, pass "
                "CheckpointManager(..., read_only=True))"
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "")
        raise CheckpointWriteError(f"{what} failed: {type(e).__name__}: {e}{hint}") from e


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
