"""shardckpt.mmengine on bad input and on MMEngine's own files: not a checkpoint, a flipped
bit, another model's checkpoint (typed errors naming path and key, nothing deleted), a
torn or corrupt newest checkpoint passed over by ``latest``, ``shardckpt convert --to
mmengine`` of a ``.pth``, a ``.pth`` that needs pickled code, the import hint, the example.
The checkpoints come from one single-process run of ``_mmengine_worker.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, state_diff

pytest.importorskip("mmengine")

from shardckpt.errors import (  # noqa: E402
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)
from shardckpt.mmengine import SkippedCheckpointWarning, latest, read  # noqa: E402

WORKER = Path(__file__).with_name("_mmengine_worker.py")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")


def _run(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mm_in")
    _run(str(WORKER), "--work-dir", str(root / "w"), "--out", str(root / "o"))
    _run(str(WORKER), "--work-dir", str(root / "native"), "--out", str(root / "no"), "--native")
    return root


def model(width: int = 16) -> torch.nn.Module:
    return torch.nn.ModuleDict({"net": torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(),
                                                            torch.nn.Linear(width, 1))})


def files_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_holds_what_mmengine_holds(runs: Path):
    ours = read(runs / "w" / "iter_8", model(), strict=True)
    native = read(runs / "native" / "iter_8.pth", model(), strict=True)
    assert set(ours) == set(native) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers",
                                        "ema_state_dict"}
    for key in ("state_dict", "optimizer", "param_schedulers", "ema_state_dict"):
        assert not state_diff(ours[key], native[key], key, bitwise=True)
    assert ours["meta"]["iter"] == native["meta"]["iter"] == 8
    assert ours["meta"]["dataset_meta"] == native["meta"]["dataset_meta"]
    loss, want = ours["message_hub"]["log_scalars"]["train/loss"], native["message_hub"]["log_scalars"]["train/loss"]
    assert type(loss) is type(want) and all((a == b).all() for a, b in zip(loss.data, want.data))


def test_not_a_checkpoint(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hello")
    with pytest.raises((CheckpointNotFoundError, UnsupportedFormatError)) as e:
        read(tmp_path / "d", model())
    assert str(tmp_path / "d") in str(e.value)
    (tmp_path / "x.pth").write_bytes(b"not a torch file at all")
    with pytest.raises((CorruptCheckpointError, UnsupportedFormatError)) as e:
        read(tmp_path / "x.pth", model())
    assert str(tmp_path / "x.pth") in str(e.value)
    assert (tmp_path / "d" / "notes.txt").exists() and (tmp_path / "x.pth").exists()


def test_flipped_bit_names_the_key_and_nothing_is_deleted(runs: Path, tmp_path: Path):
    ckpt = tmp_path / "iter_8"
    shutil.copytree(runs / "w" / "iter_8", ckpt)
    shard = max((p for p in (ckpt / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    before = files_under(ckpt)
    with pytest.raises(CorruptCheckpointError) as e:
        read(ckpt, model())
    assert str(ckpt) in str(e.value) and getattr(e.value, "key", None)
    assert files_under(ckpt) == before


def test_another_models_checkpoint_is_refused_before_reading(runs: Path):
    for path in (runs / "w" / "iter_8", runs / "native" / "iter_8.pth"):
        with pytest.raises(CheckpointMismatchError) as e:
            read(path, model(width=32))
        assert str(path) in str(e.value) and e.value.key.startswith("state_dict.net.")


def test_latest_skips_torn_and_corrupt_ones_with_a_warning(runs: Path, tmp_path: Path):
    work = tmp_path / "w"
    shutil.copytree(runs / "w", work)
    (work / "iter_8" / "manifest.json").unlink()  # torn: the save never committed
    assert latest(work) == str(work / "iter_4")
    shutil.copytree(runs / "w" / "iter_4", work / "iter_12")
    shard = next(p for p in (work / "iter_12" / "data").rglob("*") if p.is_file())
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest(work) == str(work / "iter_4")
    named = " ".join(str(w.message) for w in caught if issubclass(w.category, SkippedCheckpointWarning))
    assert str(work / "iter_8") in named and str(work / "iter_12") in named
    assert (work / "iter_8").exists() and (work / "iter_12").exists()


def test_convert_imports_an_mmengine_pth(runs: Path, tmp_path: Path):
    dst = tmp_path / "iter_4"
    p = _run("-m", "shardckpt", "convert", str(runs / "native" / "iter_4.pth"), str(dst), "--to", "mmengine")
    assert "MMEngine" in p.stdout
    got, want = read(dst, model(), strict=True), read(runs / "native" / "iter_4.pth")
    for key in ("state_dict", "optimizer", "param_schedulers", "ema_state_dict", "meta"):
        assert not state_diff(got[key], want[key], key, bitwise=True)


class Foreign:  # a class an MMEngine checkpoint never pickles
    pass


def test_a_pth_that_needs_pickled_code_is_refused_naming_the_global(runs: Path, tmp_path: Path):
    ckpt = torch.load(runs / "native" / "iter_4.pth", weights_only=False)
    ckpt["meta"]["thing"] = Foreign()
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    with pytest.raises(UnsupportedFormatError) as e:
        read(bad)
    assert "Foreign" in str(e.value) and str(bad) in str(e.value)
    p = subprocess.run([sys.executable, "-m", "shardckpt", "convert", str(bad), str(tmp_path / "out"), "--to",
                        "mmengine"], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Foreign" in p.stdout + p.stderr
    assert not (tmp_path / "out").exists() and bad.exists()


def test_without_mmengine_the_import_says_what_to_install():
    code = ("import sys; sys.modules['mmengine'] = None\n"
            "try:\n    import shardckpt.mmengine\nexcept ImportError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert 'pip install "shardckpt[mmengine]"' in p.stdout, p.stdout + p.stderr


def test_example_runs_and_resumes(tmp_path: Path):
    example = str(REPO_ROOT / "examples" / "mmengine_example.py")
    _run(example, "--work-dir", str(tmp_path / "w"), "--iters", "8")
    p = _run(example, "--work-dir", str(tmp_path / "w"), "--iters", "12", "--resume")
    assert "trained to iteration 12" in p.stdout and "iter_12" in p.stdout
