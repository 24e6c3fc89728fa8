"""Multi-tier checkpoints across real nodes: torchrun agents on loopback, each in its
own mount namespace with its own "disk" at the same local_root path
(``tests/multinode/_tiers_worker.py``), a shared directory as the durable tier.

Save every 10 steps to the local tier, persist every 20: after step 30 the
local tier holds 20 and 30 (``local_keep_last=2``), the durable tier 20.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.multinode.harness import can_mount_private_tmpfs, run_multinode

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not can_mount_private_tmpfs(),
                                                   reason="needs mount namespaces (root/CAP_SYS_ADMIN)")]
TIMEOUT_S = 120.0


class Job:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.local, self.remote = tmp, tmp / "local", tmp / "remote"
        self.disks = tmp / "disks"
        self.disks.mkdir()
        self.runs = 0

    def run(self, mode: str, nnodes: int, nproc: int, *args: str, ok: bool = True) -> dict[int, dict]:
        self.runs += 1
        results = self.tmp / f"results{self.runs}"
        results.mkdir()
        job = run_multinode([mode, str(self.local), str(self.remote), *args], nnodes=nnodes, nproc_per_node=nproc,
                            module="tests.multinode._tiers_worker", log_dir=self.tmp / "logs", timeout=TIMEOUT_S,
                            private_tmpfs=str(self.local),
                            env={"RESULT_DIR": str(results), "NODE_DISKS": str(self.disks)})
        if ok:
            job.check()
        out = {}
        for f in results.glob("rank*.json"):
            rep = json.loads(f.read_text())
            out[rep["rank"]] = rep
        if ok:
            assert sorted(out) == list(range(nnodes * nproc)), job.logs()
        self.last = job
        return out

    def restore(self, nnodes: int, nproc: int) -> tuple[int, str]:
        reps = self.run("restore", nnodes, nproc)
        for r, rep in reps.items():
            assert rep["problems"] == [], f"rank {r}: {rep['problems']}\n{self.last.logs()}"
        steps = {rep["step"] for rep in reps.values()}
        assert len(steps) == 1, steps
        log = "\n".join(reps[0]["log"])
        return steps.pop(), log

    def node_files(self, node: int, step: int) -> set[int]:
        d = self.disks / f"node{node}" / f"step_{step:010d}"
        return {int(p.name[5:]) for p in d.glob("rank_*") if (p / "manifest.json").is_file()}


def test_node_loss_all_nodes_lost_and_world_size_change(tmp_path: Path) -> None:
    job = Job(tmp_path)
    reps = job.run("train", 2, 2, "--until", "30")
    assert reps[0]["list"] == [[20, "valid", ["local", "remote"]], [30, "valid", ["local"]]]

    # Replicas never share a node with their original, asserted from the files: each node
    # holds its own ranks and a copy of each of the other node's, nothing else.
    marker = json.loads((job.disks / "node0" / "step_0000000030" / "COMMIT.json").read_text())
    nodes = marker["nodes"]
    assert len(set(nodes)) == 2 and nodes[0] == nodes[1] != nodes[2] == nodes[3]
    for node in (0, 1):
        own = {r for r in range(4) if nodes[r] == nodes[2 * node]}
        held = job.node_files(node, 30)
        assert held == set(range(4)), (node, held)  # 2 own + 2 replicas of the other node's ranks
        for r in held - own:
            assert nodes[r] != nodes[2 * node]
            holders = [n for n in (0, 1) if r in job.node_files(n, 30)]
            assert len(holders) == 2  # the original and one copy, on different nodes
        assert marker["replicas"] == [[2], [3], [0], [1]]
    assert not (job.disks / "node0" / "step_0000000010").exists()  # local_keep_last=2

    # Node 1 is lost (its disk with it) and replaced by a fresh one: step 30 from the
    # local tier, ranks 2 and 3 fetching their shards from node 0's copies.
    shutil.rmtree(job.disks / "node1")
    step, log = job.restore(2, 2)
    assert step == 30 and "from the local tier" in log and "fetch their shards" in log, log
    assert job.node_files(1, 30) == {2, 3}  # the new node holds its ranks' shards again

    # Another world size: the durable step, resharded (the local step 30 is not usable).
    step, log = job.restore(1, 3)
    assert step == 20 and "durable tier" in log and "world size 4" in log, log

    # Every node lost: the durable tier's step 20.
    shutil.rmtree(job.disks)
    job.disks.mkdir()
    step, log = job.restore(2, 2)
    assert step == 20 and "local tier" not in log.split("restored")[-1], log


def test_kill_mid_local_save_restores_previous_local_step(tmp_path: Path) -> None:
    job = Job(tmp_path)
    # Step 30's own shards are written, then every rank is SIGKILLed as replicas start.
    job.run("train", 2, 1, "--until", "30", "--persist", "1000", "--kill-at-exchange", "30", ok=False)
    assert not job.last.ok
    assert job.node_files(0, 30) == {0} and not (job.disks / "node0" / "step_0000000030" / "COMMIT.json").exists()
    assert not (job.remote / "step_0000000020").exists()  # nothing durable: the local tier alone
    step, log = job.restore(2, 1)
    assert step == 20 and "from the local tier" in log, log
    assert "step 30: no commit marker" in log or "30" not in log.split("restored")[-1], log
