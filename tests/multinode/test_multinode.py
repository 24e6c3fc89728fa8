"""Multi-node jobs: real torchrun agents on loopback, one per "node" (tests/multinode/harness.py).

What single-agent tests cannot show: a checkpoint written by 2 nodes x 2
processes must resume at a different node/process layout (1 x 3, 2 x 1) bit for
bit, and a checkpoint path that is node-local (each node has its own disk at
that path, so rank 0 never sees the other node's files) must be refused up
front with a clear error naming the ranks that cannot see rank 0's files,
instead of failing late (a missing file or a size mismatch while committing)
or, worse, committing a manifest that points at data on another machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.multinode.harness import JobResult, can_mount_private_tmpfs, run_multinode

pytestmark = pytest.mark.slow

#: Per launch. A healthy one takes 5-10 s here (2 cores; every process imports torch).
TIMEOUT_S = 90.0
#: A save onto node-local storage must be refused fast, not after a collective timeout.
REFUSE_WITHIN_S = 30.0


def _job(tmp_path: Path, args: list[str], nnodes: int, nproc: int, **kwargs) -> JobResult:
    return run_multinode(args, nnodes=nnodes, nproc_per_node=nproc, log_dir=tmp_path / "logs",
                         timeout=TIMEOUT_S, **kwargs)


def test_save_2x2_resume_1x3_and_2x1_shared_dir(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    _job(tmp_path, ["save", ckpt], nnodes=2, nproc=2).check()
    assert (tmp_path / "ckpt" / "manifest.json").is_file()
    # each load compares every rank's local shards bitwise with the seed's values
    _job(tmp_path, ["load", ckpt], nnodes=1, nproc=3).check()
    _job(tmp_path, ["load", ckpt], nnodes=2, nproc=1).check()


def test_node_local_path_is_detected(tmp_path: Path) -> None:
    if not can_mount_private_tmpfs():
        pytest.skip("needs mount namespaces (unshare -m and mount -t tmpfs, i.e. root/CAP_SYS_ADMIN)")
    local = tmp_path / "node_local"  # a private tmpfs in each agent: node 0 never sees node 1's files
    results = tmp_path / "results"  # shared: every rank reports here
    results.mkdir()
    job = _job(tmp_path, ["save-expect-error", str(local / "ckpt")], nnodes=2, nproc=2,
               private_tmpfs=str(local), env={"RESULT_DIR": str(results)})
    reports = {}
    for rank in range(4):
        f = results / f"rank{rank}.txt"
        assert f.is_file(), f"rank {rank} wrote no report (crashed or hung?)\n{job.logs()}"
        reports[rank] = json.loads(f.read_text())
    committed = [r for r, rep in reports.items() if rep["outcome"] == "committed"]
    assert not committed, f"save onto node-local storage returned normally on ranks {committed}\n{job.logs()}"
    for rank, rep in reports.items():
        where = f"rank {rank}: {rep['type']}: {rep['message']}\n{rep.get('traceback', '')}"
        assert rep["type"] == "CheckpointWriteError", where
        assert "not on storage shared by all ranks" in rep["message"], where
        # the ranks on the other node than rank 0's, which cannot see its probe file:
        # "rank [2, 3]", "ranks [2, 3]" or the gathered errors' "rank(s) [2, 3]"
        assert re.search(r"rank(?:s|\(s\))? \[2, 3\]", rep["message"]), where
        assert rep["elapsed_s"] < REFUSE_WITHIN_S, where
    job.check()  # every worker exits 0 exactly when it raised CheckpointWriteError
    # nothing leaked out of the agents' private mounts into the shared namespace
    assert not (local / "ckpt").exists()


@pytest.mark.s3
def test_save_2x2_resume_1x3_and_2x1_s3(tmp_path: Path, s3_bucket) -> None:
    """The same resume over S3: every node reaches the bucket, nothing is node-local.
    ``s3_bucket`` (conftest): ``.url(prefix)`` -> ``s3://bucket/prefix`` and
    ``.storage_options`` for shardckpt's ``storage_options=``."""
    url = s3_bucket.url("multinode/ckpt")
    opts = ["--storage-options", json.dumps(s3_bucket.storage_options)]
    _job(tmp_path, ["save", url, *opts], nnodes=2, nproc=2).check()
    _job(tmp_path, ["load", url, *opts], nnodes=1, nproc=3).check()
    _job(tmp_path, ["load", url, *opts], nnodes=2, nproc=1).check()
