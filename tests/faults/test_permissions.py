"""Checkpoint directories that cannot be written: a read-only mount (EROFS) and a
directory the process may not write (EACCES, a child dropped to uid 65534, since
chmod does not stop root). Runs ``tests/faults/_permissions_worker.py`` in a private
mount namespace; the worker asserts, this test checks its report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.figures import record

WORKER = Path(__file__).with_name("_permissions_worker.py")
SKIP = 77


def test_unwritable_directory_fails_typed_before_staging_and_existing_checkpoint_loads():
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount not available: cannot make a read-only mount")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(WORKER)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode == SKIP or (done.returncode != 0 and "unshare failed" in done.stderr):
        pytest.skip(f"mounting is not permitted here: {(done.stdout + done.stderr).strip()[-300:]}")
    assert done.returncode == 0, done.stderr.strip()[-3000:]
    cases = {c["case"]: c for c in map(json.loads, done.stdout.strip().splitlines())}
    assert set(cases) == {"read-only mount", "not permitted"}
    assert "Read-only file system" in cases["read-only mount"]["error"]
    assert "Permission denied" in cases["not permitted"]["error"]
    for c in cases.values():
        assert c["manager_error"]  # a typed ShardckptError, checked by the worker
        record("permissions", case=c["case"], tried=1, untyped=0, staged=0, existing_loads=1, existing_verifies=1,
               seconds=c["seconds"])
