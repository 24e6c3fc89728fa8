"""Permissions scenario, run by ``tests/faults/test_permissions.py`` as
``unshare -m --propagation private python tests/faults/_permissions_worker.py`` (it mounts a
fresh tmpfs on a new directory under ``/``, visible only in its private mount namespace).

We run as root, and chmod does not stop root; so the unwritable places are
real ones: a tmpfs remounted read-only (EROFS), and a root-owned 0755 directory
seen by a forked child that dropped to uid 65534 (EACCES).

For each: saving into it raises a typed ``CheckpointWriteError`` naming the
cause (``async_save`` raises from the call itself, while planning: no tensor is
staged) and creates nothing; a CheckpointManager on it raises a ``ShardckptError``; a
checkpoint already there still loads bitwise and verifies. Prints one JSON line
per case; exit code 77 means mounting is not permitted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import torch

import shardckpt

SKIP = 77
STATE = {"w": torch.arange(1 << 14, dtype=torch.float32), "b": torch.ones(7, dtype=torch.float64)}


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"SKIP: mount {' '.join(args)}: {done.stderr.strip()}")
        sys.exit(SKIP)


def expect_typed(what: str, fn: Callable[[], object], cls: type[Exception], *words: str) -> str:
    try:
        fn()
    except cls as e:
        text = str(e)
        if not any(w in text for w in words):
            raise SystemExit(f"{what}: the error does not name the cause ({words}): {e!r}") from e
        return text
    except Exception as e:  # noqa: BLE001 - the wrong type is the failure reported
        raise SystemExit(f"{what}: raised {type(e).__name__}, not {cls.__name__}: {e!r}") from e
    raise SystemExit(f"{what}: did not raise")


def check_place(case: str, place: str, existing: str, words: tuple[str, ...]) -> dict[str, object]:
    """Everything asserted about one unwritable ``place`` holding the checkpoint ``existing``."""
    t0 = time.monotonic()
    sync_error = expect_typed(f"{case}: save", lambda: shardckpt.save({"state": STATE}, os.path.join(place, "new")),
                              shardckpt.CheckpointWriteError, *words)
    ckpt = shardckpt.AsyncCheckpointer()
    # async_save itself raises (no handle comes back): planning runs before staging.
    expect_typed(f"{case}: async_save", lambda: ckpt.async_save({"state": STATE}, os.path.join(place, "new_async")),
                 shardckpt.CheckpointWriteError, *words)
    if ckpt._pool.held_bytes:
        raise SystemExit(f"{case}: {ckpt._pool.held_bytes} bytes were staged for a save that could not start")
    ckpt.close()
    manager_error = expect_typed(f"{case}: CheckpointManager", lambda: shardckpt.CheckpointManager(
        os.path.join(place, "run")), shardckpt.ShardckptError, *words)
    seconds = time.monotonic() - t0
    # A manager over a root it cannot write: refused with the way out named; read_only restores.
    expect_typed(f"{case}: CheckpointManager over a saved root", lambda: shardckpt.CheckpointManager(
        os.path.join(place, "mgr")), shardckpt.CheckpointWriteError, "read_only=True")
    reader = shardckpt.CheckpointManager(os.path.join(place, "mgr"), read_only=True)
    got = {k: torch.zeros_like(v) for k, v in STATE.items()}
    if reader.restore(got) != 1 or not all(torch.equal(got[k], v) for k, v in STATE.items()):
        raise SystemExit(f"{case}: a read_only manager did not restore step 1 bitwise")
    expect_typed(f"{case}: read_only save", lambda: reader.save(2, got, force=True),
                 shardckpt.CheckpointWriteError, "read_only")
    reader.close()
    # What is already there still loads and verifies.
    got = {k: torch.zeros_like(v) for k, v in STATE.items()}
    shardckpt.load({"state": got}, existing)
    if not all(torch.equal(got[k], v) for k, v in STATE.items()):
        raise SystemExit(f"{case}: the existing checkpoint does not load bitwise")
    shardckpt.verify(existing)
    leftovers = [p for p in ("new", "new_async") if os.path.exists(os.path.join(place, p))]
    if leftovers:
        raise SystemExit(f"{case}: the failed saves left {leftovers} behind")
    return {"case": case, "seconds": round(seconds, 3), "error": sync_error[:300], "manager_error": manager_error[:300]}


def as_nobody(case: str, place: str, existing: str) -> dict[str, object]:
    """``check_place`` in a forked child running as uid/gid 65534."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = json.dumps(check_place(case, place, existing, ("Permission denied", "EACCES")))
        except SystemExit as e:
            out, code = json.dumps({"case": case, "failure": str(e.code)}), 1
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out, code = json.dumps({"case": case, "failure": "".join(traceback.format_exception(e))[-2000:]}), 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(data) if data else {"case": case, "failure": f"child died: status {status}"}
    if "failure" in result:
        raise SystemExit(f"{case}: {result['failure']}")
    return result


def main() -> None:
    # A fresh tmpfs right under / in this namespace: every directory above the places
    # is then one anybody may traverse (a test's own temporary directory is root's
    # 0700), so an EACCES can only come from the place itself. Not over /tmp: the
    # checkout itself may live there (CI clones into /tmp), and lazily imported
    # modules must stay visible.
    mnt = f"/shardckpt-perm-{os.getpid()}"
    os.makedirs(mnt, mode=0o755)
    try:
        mount("-t", "tmpfs", "-o", "size=16m,mode=1777", "tmpfs", mnt)
        run_cases(mnt)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        os.rmdir(mnt)


def run_cases(mnt: str) -> None:
    ro, owned = os.path.join(mnt, "ro"), os.path.join(mnt, "owned")
    os.makedirs(ro)
    os.makedirs(owned)
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", ro)
    for place in (ro, owned):
        shardckpt.save({"state": STATE}, os.path.join(place, "existing"))
        with shardckpt.CheckpointManager(os.path.join(place, "mgr")) as mgr:
            mgr.save(1, STATE)
    os.chmod(owned, 0o755)  # root's: others may read and traverse, not write
    mount("-o", "remount,ro", ro)
    results = [check_place("read-only mount", ro, os.path.join(ro, "existing"), ("Read-only file system", "EROFS")),
               as_nobody("not permitted", owned, os.path.join(owned, "existing"))]
    for res in results:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
