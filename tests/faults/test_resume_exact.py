"""Kill and resume at the SAME world size: the resumed run ends bitwise equal to an
uninterrupted run — parameters, optimizer state, RNG states (every tensor chunk's
CRC32C in the final checkpoints), scheduler and sampler state, and samples seen.

Runs real torchrun jobs through the demo's job control (a SIGKILL while an async
save is in flight) in a subprocess, so the driver's process-reaping setup stays
out of the test process.
"""

import json
import subprocess
import sys
import textwrap

import torch

from shardckpt.manager import step_dirname
from tests.manifest_view import entries_view

STEPS = 16
DRIVER = textwrap.dedent("""
    import json, os, sys
    from shardckpt.demo import jobs as demo
    from shardckpt.demo.checks import global_batches
    from shardckpt.demo.worker import DemoConfig

    work = sys.argv[1]
    cfg = DemoConfig(seed=11, total_steps={steps}, save_interval=4)
    run_dir = os.path.join(work, "run")
    for d in ("samples", "markers", "pids", "logs"):
        os.makedirs(os.path.join(run_dir, d), exist_ok=True)
    demo.become_subreaper()
    try:
        ref = demo.Job(run_dir, os.path.join(work, "ref"), "ref", 2, cfg)
        demo.run_to_end(ref)
        killed = demo.Job(run_dir, os.path.join(work, "ckpt"), "b", 2, cfg, ["--freeze-at", "8", "--jitter-ms", "2"])
        torn = demo.kill_mid_save(killed)
        resumed = demo.Job(run_dir, os.path.join(work, "ckpt"), "c", 2, cfg)
        demo.run_to_end(resumed)
    finally:
        for job in demo.started:
            if job.alive():
                job.kill()
    batches = {{p: {{str(k): v for k, v in global_batches(run_dir, p, 2).items()}} for p in ("ref", "b", "c")}}
    print(json.dumps({{"torn": torn, "batches": batches}}))
""").format(steps=STEPS)


def _entries(root):
    return entries_view(root / step_dirname(STEPS))


def _tensor_fingerprint(entry):
    shards = sorted(entry["shards"], key=lambda s: s["offsets"])
    return entry["dtype"], entry["shape"], [(s["offsets"], s["sizes"], [c[3] for c in s["chunks"]]) for s in shards]


def test_same_world_size_kill_and_resume_is_bitwise_exact(tmp_path):
    out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    torn = result["torn"]
    assert torn["manifest"] is False and torn["step"] >= 8  # the kill hit an uncommitted save

    # final parameters, bitwise
    ref_p = torch.load(tmp_path / "run" / "ref.params.pt", weights_only=True)
    got_p = torch.load(tmp_path / "run" / "c.params.pt", weights_only=True)
    assert ref_p.keys() == got_p.keys()
    assert all(torch.equal(ref_p[k], got_p[k]) for k in ref_p)

    # final checkpoints: every tensor (model, Adam moments and steps, RNG states) bitwise,
    # every other value equal except environment metadata (hostname, time)
    ref, got = _entries(tmp_path / "ref"), _entries(tmp_path / "ckpt")
    assert ref.keys() == got.keys()
    tensors = [k for k, e in ref.items() if e["kind"] == "tensor"]
    assert any("exp_avg_sq" in k for k in tensors) and any(k.endswith(".step") for k in tensors), tensors
    for k in tensors:
        assert _tensor_fingerprint(ref[k]) == _tensor_fingerprint(got[k]), k
    blobs = [k for k, e in ref.items() if e["kind"] == "object" and "file" in e]
    assert "state.rng" in blobs  # every rank's python/numpy/torch RNG, weights-only encoded
    for k in blobs:
        assert [c[3] for c in ref[k]["chunks"]] == [c[3] for c in got[k]["chunks"]], k
    inline = [k for k, e in ref.items() if e["kind"] == "object" and "value" in e and k != "state.env"]
    assert any(k.startswith("state.scheduler.") for k in inline) and "state.sampler.consumed" in inline
    for k in inline:
        assert ref[k]["value"] == got[k]["value"], k

    # the samples trained on: the killed run up to its last finished step, then the resumed run
    batches = result["batches"]
    resumed_from = min(int(s) for s in batches["c"])
    job = {**{s: v for s, v in batches["b"].items() if int(s) < resumed_from}, **batches["c"]}
    assert job == batches["ref"]
    assert sorted(int(s) for s in job) == list(range(1, STEPS + 1))
