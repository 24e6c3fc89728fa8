"""shardckpt.transformers as a package: a clear ImportError without the extra, and
the FSDP2 path (Trainer's ``fsdp`` arguments) on GPUs: saved at N processes,
resumed at another N. Transformers runs FSDP only on GPU/NPU; on CPU it falls back
to DDP, which the other test files cover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.integrations.launch import result_of, run_workers

WORKER = Path(__file__).with_name("_transformers_worker.py")


def test_import_without_transformers_says_which_extra() -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import shardckpt.transformers\n"
            "except ImportError as e:\n    print('IMPORT-ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert 'IMPORT-ERROR' in out.stdout and 'pip install "shardckpt[transformers]"' in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP under Trainer needs 2 CUDA devices")
def test_fsdp2_save_and_resume_at_another_size(tmp_path: Path) -> None:
    nproc = min(torch.cuda.device_count(), 4)
    out = tmp_path / "run"
    first = result_of(run_workers(nproc, WORKER, ["--out", str(out), "--max-steps", "4", "--save-steps", "2",
                                                  "--fsdp", "--final", str(tmp_path / "at4.pt")])[1])
    assert first["fsdp"] and first["global_step"] == 4
    loaded = tmp_path / "loaded.pt"
    for n in sorted({nproc // 2, nproc} - {0}):
        res = result_of(run_workers(n, WORKER, ["--out", str(out), "--max-steps", "6", "--save-steps", "6", "--fsdp",
                                                "--resume", str(out / "checkpoint-4"),
                                                "--dump-after-load", str(loaded)])[1])
        assert res["resumed_from"] == str(out / "checkpoint-4") and res["global_step"] == 6
        got, want = torch.load(loaded, weights_only=True), torch.load(tmp_path / "at4.pt", weights_only=True)
        assert set(got) == set(want) and all(torch.equal(got[k].cpu(), want[k].cpu()) for k in want)
