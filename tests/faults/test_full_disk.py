"""A CheckpointManager root on a full disk: a size-limited tmpfs mounted in a
private mount namespace (``unshare -m --propagation private``), so the mount is
never seen outside the worker and vanishes with it. The scenario and its
assertions live in ``tests/faults/_fulldisk_worker.py``; this file runs it for a
synchronous and an asynchronous manager and checks what it reports.
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

WORKER = Path(__file__).with_name("_fulldisk_worker.py")
MODES = ("sync", "async")
SKIP = 77


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    """Run the worker once per mode (both at once); the mode's JSON report."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare/mount not available: cannot mount a size-limited tmpfs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for mode in MODES:
        mnt = tmp_path_factory.mktemp(f"fulldisk-{mode}")
        procs[mode] = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", sys.executable, str(WORKER), str(mnt), mode],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    try:
        for mode, p in procs.items():
            stdout, stderr = p.communicate(timeout=120)
            if p.returncode == SKIP or (p.returncode != 0 and "unshare failed" in stderr):
                pytest.skip(f"mounting is not permitted here: {(stdout + stderr).strip()[-300:]}")
            assert p.returncode == 0, f"{mode}: {stderr.strip()[-3000:]}"
            out[mode] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_save_that_does_not_fit_fails_typed_and_commits_nothing(reports, mode):
    r = reports[mode]
    # The worker asserted: CheckpointWriteError with errno ENOSPC in its cause chain (async:
    # from result() and from the next save), no manifest, no partial data file, the earlier
    # checkpoint loads bitwise and verifies, and the save after freeing space succeeds.
    assert "No space left on device" in r["error"]
    assert r["leftovers"] == 0
    # The manager's next save also cleans the failed save's incomplete leftovers.
    assert r["stale_after_next_save"] == []
    record("full disk", mode=mode, tried=1, untyped=0, committed=0, partial_files=r["leftovers"],
           earlier_intact=1, next_save_ok=1, seconds=r["seconds"])


@pytest.mark.parametrize("mode", MODES)
def test_failed_save_leaves_no_probe(reports, mode):
    assert reports[mode]["probes_left"] == []
