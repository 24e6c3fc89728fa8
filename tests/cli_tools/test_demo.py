"""``python -m shardckpt.demo.driver`` end to end (real torchrun jobs, killed and resumed at
2 → 3 → 1 ranks), plus the demo's own checkers on doctored records: a checker that
cannot fail proves nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from shardckpt import CheckpointManager
from shardckpt.demo.checks import check_params, check_samples
from shardckpt.demo.worker import DemoConfig, make_model
from shardckpt.state import ResumableSampler

CHECKS = ("sample order", "parameters", "killed save", "preemption", "retention")


def test_demo_kill_and_resume_end_to_end(tmp_path):
    work = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "shardckpt.demo.driver", "--quick", "--seed", "7", "--workdir", str(work), "--keep"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for name in CHECKS:
        assert re.search(rf"\[PASS\] {name}:", out.stdout), text
    assert "[FAIL]" not in out.stdout and "ALL CHECKS PASSED" in out.stdout, text
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if re.match(r"\s+(reference|b|c|d)\s+\d\s", line)}
    assert [rows[p][1] for p in ("reference", "b", "c", "d")] == ["1", "2", "3", "1"], text
    assert "SIGKILL mid-save" in " ".join(rows["b"]), text
    # Independently of the demo's report: the run ended with three verified checkpoints,
    # the last one at the final step, and nothing torn left behind.
    with CheckpointManager(work / "ckpt") as mgr:
        final = mgr.list(deep=True)
    assert [c.status for c in final] == ["valid"] * 3
    assert final[-1].step == DemoConfig(total_steps=24).total_steps
    # --keep left the demo's three parts, and nothing else, in the given --workdir.
    assert sorted(os.listdir(work)) == ["ckpt", "ckpt-reference", "run"]


def _batches(cfg: DemoConfig) -> dict[int, tuple[int, list[int]]]:
    """What an uninterrupted run trains on: step -> (epoch, global batch)."""
    sampler = ResumableSampler(range(cfg.dataset_len), seed=cfg.seed)
    out = {}
    for step in range(1, cfg.total_steps + 1):
        epoch, k = divmod(step - 1, cfg.steps_per_epoch)
        order = sampler.global_order(epoch).tolist()
        out[step] = (epoch, order[k * cfg.global_batch:(k + 1) * cfg.global_batch])
    return out


def test_sample_check_fails_on_a_repeated_or_reordered_batch():
    cfg = DemoConfig(total_steps=24)
    ref = _batches(cfg)
    ok, msg = check_samples(cfg, ref, [(ref, 1, 10), (ref, 11, 24)])
    assert ok, msg
    repeated = dict(ref)
    repeated[11] = ref[10]  # a resume that re-trains the last batch before the checkpoint
    ok, msg = check_samples(cfg, ref, [(ref, 1, 10), (repeated, 11, 24)])
    assert not ok and "steps [11]" in msg
    # Both runs wrong the same way: the per-epoch permutation check still catches it.
    ok, msg = check_samples(cfg, repeated, [(repeated, 1, 24)])
    assert not ok and "epoch 0" in msg
    swapped = dict(ref)
    swapped[3] = (0, ref[3][1][::-1])  # same samples, other order within the step
    ok, _ = check_samples(cfg, swapped, [(swapped, 1, 24)])
    assert not ok
    ok, msg = check_samples(cfg, ref, [(ref, 1, 10), (ref, 12, 24)])  # a step nobody owns
    assert not ok and "[11]" in msg


def test_param_check_tolerance_is_far_below_a_lost_step(tmp_path):
    cfg = DemoConfig(total_steps=24, hidden=64)
    ref = make_model(cfg).state_dict()
    torch.save(ref, tmp_path / "ref.pt")
    # float-reduction-order noise: passes
    noisy = {k: v + 3e-7 * torch.randn_like(v) for k, v in ref.items()}
    torch.save(noisy, tmp_path / "noisy.pt")
    ok, msg = check_params(cfg, str(tmp_path / "ref.pt"), str(tmp_path / "noisy.pt"))
    assert ok, msg
    # one AdamW step more or less moves parameters by about lr = 1e-3: fails
    stepped = {k: v + cfg.lr * torch.sign(torch.randn_like(v)) for k, v in ref.items()}
    torch.save(stepped, tmp_path / "stepped.pt")
    ok, msg = check_params(cfg, str(tmp_path / "ref.pt"), str(tmp_path / "stepped.pt"))
    assert not ok and "max |diff| 1.0e-03" in msg
